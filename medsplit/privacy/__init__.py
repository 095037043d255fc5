"""Privacy: what an honest-but-curious aggregator can learn, and what a site does about it.

``measures`` holds the statistics every attack is scored with (distance correlation, SSIM,
reconstruction gain, leak AUC); ``defenses`` what a site applies to the cut-layer tensors it
sends. The attacks themselves live with the sweep that runs them (``experiments.privacy``):
a deployment never runs them, it only defends. docs/privacy.md has the threat model.
"""
