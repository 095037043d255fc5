"""Certificates, the broker's configuration and ACL, and revocation.

``pki`` is the certificate authority (``cryptography``, never a shell-out to openssl);
``provision`` turns one federation description into every participant's kit, as NVIDIA
FLARE's provisioner does, and adds, renews and revokes participants afterwards;
``revocation`` is what a running aggregator reads to refuse a revoked identity itself.
"""
