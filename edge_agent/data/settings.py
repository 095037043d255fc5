"""The ``data`` section of a site.yaml, and the names it may use -- without torch or pydicom.

These are the settings of every data source (DICOM folder, CSV table, built-in share) and the
image preprocessing; the loaders that use them live beside this module. Kept free of heavy
imports so that a site.yaml is validated, and its typos reported, in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.data.names import DATASETS, SCHEMES, check_name, parse_scheme

if TYPE_CHECKING:
    import torch


class Standardisation(BaseModel):
    """``(x - mean) / std`` after scaling to [0, 1]: what the statistics round fixes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float | list[float] = Field(
        0.0, description="subtracted after scaling to [0, 1] (one value, or one per channel)"
    )
    std: float | list[float] = Field(1.0, description="then divided by (positive)")

    @model_validator(mode="after")
    def _positive_std(self) -> Standardisation:
        stds = self.std if isinstance(self.std, list) else [self.std]
        if not stds or any(not s > 0 for s in stds):
            raise ValueError(f"std: every value must be positive, got {self.std}")
        lists = isinstance(self.mean, list) and isinstance(self.std, list)
        if lists and len(self.mean) != len(self.std):  # type: ignore[arg-type]
            raise ValueError("mean and std: give as many values as channels in each")
        return self

    def standardise(self, image: torch.Tensor) -> torch.Tensor:
        """``(image - mean) / std``, per channel where mean and std are lists ([C, ...])."""
        import torch  # noqa: PLC0415 - reading a site.yaml must not load torch

        def per_channel(value: float | list[float]) -> float | torch.Tensor:
            if not isinstance(value, list):
                return value
            shape = (-1,) + (1,) * (image.dim() - 1)
            return torch.tensor(value, dtype=image.dtype).reshape(shape)

        return (image - per_channel(self.mean)) / per_channel(self.std)


Window = tuple[float, float] | Literal["auto"] | None


class Windowed(Standardisation):
    """Which physical values become 0..1: a window, a file's own, or the site's range."""

    window: Window = Field(
        None,
        description="(center, width) in physical units, fixed for every file (e.g. [40, 400] "
        "for soft-tissue CT); 'auto' ignores the files' stored windows and uses range; "
        "default: each file's (or series') own window, else range",
    )
    range: tuple[float, float] | None = Field(
        None,
        description="physical values shown as 0..1 without a window (or with window: auto); "
        "default: fixed per site, from the 0.5-99.5 percentiles of its images or volumes",
    )

    @model_validator(mode="after")
    def _ordered_range(self) -> Windowed:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range: the low end must be below the high end, got {self.range}")
        return self


class Preprocessing(Windowed):
    """How images are prepared: the same in training, at every site, and when serving."""

    size: int = Field(64, ge=8, le=4096, description="images are resized to size x size")
    frame: int = Field(0, ge=0, description="which frame of a multi-frame file")


class VolumePreprocessing(Windowed):
    """How 3-D volumes are prepared: resampled onto one grid, the same at every site."""

    spacing: tuple[float, float, float] = Field(
        (2.0, 2.0, 2.0),
        description="voxel size in mm along (inferior-superior, posterior-anterior, right-left)",
    )
    size: tuple[int, int, int] = Field(
        (32, 64, 64),
        description="voxels (depth, height, width) kept around the volume's centre: cropped "
        "or padded to this; must match the plan's model input",
    )

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not s > 0 for s in spacing):
            raise ValueError(f"every spacing must be positive (mm), got {list(spacing)}")
        return spacing

    @field_validator("size")
    @classmethod
    def _sane_size(cls, size: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 4 <= s <= 1024 for s in size):
            raise ValueError(f"every size must be 4..1024 voxels, got {list(size)}")
        return size


Key = Literal["file", "sop_instance_uid", "patient_id"]


class LabelledImages(BaseModel):
    """What every image source shares: the label table's columns, the classes, the decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_column: str | None = Field(None, description="default: the key's name")
    label_column: str = "label"
    classes: list[str] = Field(min_length=2, description="label values, in class-index order")
    multilabel: bool = Field(
        False,
        description="the label column lists any of the classes per record, separated by "
        "label_separator (empty: none of them); the job sets training.multilabel too",
    )
    label_separator: str = Field("|", min_length=1, max_length=3)
    preprocessing: Preprocessing = Preprocessing()
    on_bad_input: Literal["skip", "fail"] = "fail"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _distinct_classes(self) -> LabelledImages:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: values must be distinct, got {self.classes}")
        return self


class DicomData(LabelledImages):
    """A site's ``data`` section for DICOM images. See docs/data.md."""

    source: Literal["dicom"] = "dicom"
    folder: Path
    labels: Path | None = Field(None, description="default: FOLDER/labels.csv")
    key: Key = Field("file", description="what the key column holds")
    cache_dir: Path | None = Field(
        None, description="keep decoded images here (on the site) to skip decoding on restart"
    )

    @property
    def labels_path(self) -> Path:
        return self.labels or self.folder / "labels.csv"


class PictureData(LabelledImages):
    """A site's ``data`` section for PNG or JPEG files. See docs/data.md."""

    source: Literal["images"] = "images"
    folder: Path
    labels: Path | None = Field(None, description="default: FOLDER/labels.csv")
    key_column: str | None = Field(
        None, description="the column of file paths, relative to the folder; default: file"
    )
    patient_column: str | None = Field(
        None, description="split train/test by this column of the labels table (default: by file)"
    )
    channels: Literal[1, 3] = Field(
        1, description="1: grayscale (colour becomes luminance); 3: RGB"
    )

    @model_validator(mode="after")
    def _no_dicom_settings(self) -> PictureData:
        if self.preprocessing.window is not None or self.preprocessing.frame != 0:
            raise ValueError("preprocessing.window and frame apply to DICOM only; leave them out")
        return self

    @property
    def key(self) -> Literal["file"]:
        return "file"

    @property
    def labels_path(self) -> Path:
        return self.labels or self.folder / "labels.csv"


class VolumeData(LabelledImages):
    """A site's ``data`` section for 3-D volumes: DICOM series or NIfTI files. See docs/data.md."""

    source: Literal["volumes"] = "volumes"
    format: Literal["dicom", "nifti"] = Field(
        "dicom",
        description="dicom: the folder's files grouped into series by SeriesInstanceUID; "
        "nifti: each .nii or .nii.gz file is one volume",
    )
    folder: Path
    labels: Path | None = Field(None, description="default: FOLDER/labels.csv")
    key_column: str | None = Field(
        None,
        description="default: series_instance_uid (dicom) or file, the path relative to the "
        "folder (nifti)",
    )
    patient_column: str | None = Field(
        None, description="nifti: split train/test by this column (dicom: by PatientID)"
    )
    preprocessing: VolumePreprocessing = VolumePreprocessing()  # type: ignore[assignment]
    cache_dir: Path | None = Field(
        None, description="keep decoded volumes here (on the site) to skip decoding on restart"
    )

    @property
    def key(self) -> Literal["series_instance_uid", "file"]:
        return "series_instance_uid" if self.format == "dicom" else "file"

    @property
    def labels_path(self) -> Path:
        return self.labels or self.folder / "labels.csv"


class PacsAuth(BaseModel):
    """How the agent proves itself to the PACS: a bearer token, a user and password, and/or a
    client certificate; secrets are read from files (a mounted Secret), never written inline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_file: Path | None = Field(None, description="a file holding a bearer token")
    username: str | None = Field(None, description="HTTP basic authentication's user")
    password_file: Path | None = Field(None, description="a file holding that user's password")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, description="its private key (PEM)")
    ca_file: Path | None = Field(
        None, description="CA bundle that signed the PACS's certificate; default: the system's"
    )

    @model_validator(mode="after")
    def _complete(self) -> PacsAuth:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: give both or neither")
        if self.token_file is not None and self.username is not None:
            raise ValueError("give token_file or username/password_file, not both")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class DicomWebData(LabelledImages):
    """A site's ``data`` section for images in its PACS, read over DICOMweb. See docs/data.md."""

    source: Literal["dicomweb"] = "dicomweb"
    url: str = Field(
        pattern=r"^https?://\S+$",
        description="the PACS's DICOMweb root, e.g. https://pacs.example.org/dicom-web",
    )
    labels: Path = Field(description="the labels table, keyed by SOP (or Series) Instance UID")
    key: Literal["sop_instance_uid", "series_instance_uid"] = Field(
        "sop_instance_uid",
        description="what the key column holds: instances (2-D images), or series (3-D "
        "volumes, with the volume preprocessing: spacing, size [depth, height, width])",
    )
    preprocessing: Preprocessing | VolumePreprocessing = Preprocessing()  # type: ignore[assignment]
    auth: PacsAuth = PacsAuth()
    cache_dir: Path = Field(
        description="where retrieved instances and decoded images are kept, on the site's disk"
    )
    timeout_s: float = Field(60.0, gt=0, description="per request to the PACS")
    retries: int = Field(
        3, ge=0, description="per request, on connection errors and 408/429/502/503/504"
    )
    query_batch: int = Field(
        40, ge=1, le=200, description="UIDs matched per QIDO-RS query (a list of UIDs)"
    )

    @model_validator(mode="before")
    @classmethod
    def _volume_preprocessing(cls, data: object) -> object:
        """Series are volumes: their preprocessing is read as a volume's (an empty one too)."""
        if isinstance(data, dict) and data.get("key") == "series_instance_uid":
            given = data.get("preprocessing")
            if given is None or isinstance(given, dict):
                return {**data, "preprocessing": VolumePreprocessing.model_validate(given or {})}
        return data

    @model_validator(mode="after")
    def _preprocessing_fits_key(self) -> DicomWebData:
        volumes = self.key == "series_instance_uid"
        if volumes != isinstance(self.preprocessing, VolumePreprocessing):
            raise ValueError(
                "preprocessing: series_instance_uid keys take a volume's (spacing, size as "
                "[depth, height, width]); sop_instance_uid keys an image's (size as one number)"
            )
        return self

    @property
    def labels_path(self) -> Path:
        return self.labels


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float]
    std: list[float]


class CsvData(BaseModel):
    """A site's ``data`` section for an EHR table. See docs/data.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["csv"] = "csv"
    path: Path
    label_column: str | None = Field(
        None, description="the label; left out only by a vertical job's parties without labels"
    )
    classes: list[str] = Field(
        default_factory=list, description="label values, in class-index order"
    )
    multilabel: bool = Field(
        False,
        description="the label column lists any of the classes per record, separated by "
        "label_separator (empty: none of them); the job sets training.multilabel too",
    )
    label_separator: str = Field("|", min_length=1, max_length=3)

    numeric: list[str] = Field(default_factory=list, description="numeric feature columns")
    categorical: dict[str, list[str]] = Field(
        default_factory=dict, description="column -> its categories, one-hot in this order"
    )
    missing: Literal["fail", "drop", "impute"] = "fail"
    normalization: Normalization | None = Field(
        None, description="per numeric feature; from `medsplit data-stats --combine`"
    )
    patient_column: str | None = Field(None, description="split train/test by this column")
    on_bad_input: Literal["skip", "fail"] = "fail"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    key_column: str | None = Field(
        None,
        description="vertical jobs: the patient identifier every party's table carries "
        "(docs/vertical.md); the rows are then split once the parties have aligned",
    )
    key_secret_file: Path | None = Field(
        None,
        description="vertical jobs: a secret the parties share and the aggregator does not; "
        "keys are salted with it (and the job id) before they are compared",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CsvData:
        if not self.numeric and not self.categorical:
            raise ValueError("list at least one feature column in numeric or categorical")
        if self.label_column is None and self.key_column is None:
            raise ValueError("label_column: required (only a vertical party may hold no labels)")
        if self.label_column is not None and len(self.classes) < 2:
            raise ValueError("classes: list the label values (two or more), in class-index order")
        if (self.key_column is None) != (self.key_secret_file is None):
            raise ValueError(
                "key_column and key_secret_file: a vertical party gives both (docs/vertical.md)"
            )
        labels = [self.label_column] if self.label_column else []
        keys = [self.key_column] if self.key_column else []
        columns = [*self.numeric, *self.categorical, *labels, *keys]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"columns used twice: {repeated}")
        for column, categories in self.categorical.items():
            if len(categories) < 1 or len(set(categories)) != len(categories):
                raise ValueError(
                    f"categorical.{column}: list distinct categories, got {categories}"
                )
        norm = self.normalization
        if norm is not None and not (len(norm.mean) == len(norm.std) == len(self.numeric)):
            raise ValueError(
                f"normalization: needs one mean and one std per numeric column ({len(self.numeric)})"
            )
        if norm is not None and any(s <= 0 for s in norm.std):
            raise ValueError("normalization.std: every value must be positive")
        return self

    @property
    def features(self) -> list[str]:
        """Names of the model's inputs, in order (for export metadata and error messages)."""
        from edge_agent.data.csv_source import feature_input  # noqa: PLC0415 - loads torch

        return feature_input(self).features


class BuiltinData(BaseModel):
    """A share of a built-in dataset: what the demo and the experiments give each site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["builtin"] = "builtin"
    dataset: str = Field("breast-cancer", description=f"one of {', '.join(DATASETS)}")
    partition: str = Field("iid", description=SCHEMES)
    num_sites: int = Field(1, ge=1)
    index: int = Field(0, ge=0, description="which share, 0-based")
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)

    _known_dataset = field_validator("dataset")(lambda cls, name: check_name(name))

    @field_validator("partition")
    @classmethod
    def _scheme(cls, scheme: str) -> str:
        parse_scheme(scheme)
        return scheme

    @model_validator(mode="after")
    def _index_in_range(self) -> BuiltinData:
        if self.index >= self.num_sites:
            raise ValueError(f"index: {self.index} is out of range for num_sites={self.num_sites}")
        return self


class VerticalBuiltinData(BaseModel):
    """A party of a vertical job over built-in data, for a seeded share of its patients
    (docs/vertical.md): a block of breast-cancer's columns, or synthetic-cxr's clinical table
    (``index`` 0) or radiographs (``index`` 1). Parties of one job name the same dataset,
    ``parties`` and ``seed``, each its own ``index``; the label party says ``labels: true``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["builtin-vertical"] = "builtin-vertical"
    dataset: Literal["breast-cancer", "synthetic-cxr"] = Field(
        "breast-cancer",
        description="breast-cancer (columns in blocks) or synthetic-cxr (a table and images)",
    )
    parties: int = Field(
        2, ge=2, le=10, description="how many parties divide it (synthetic-cxr: 2)"
    )
    index: int = Field(
        0, ge=0, description="which block of columns, 0-based (synthetic-cxr: 0 table, 1 images)"
    )
    labels: bool = Field(False, description="this party holds the labels")
    coverage: float = Field(
        0.9, gt=0, le=1, description="the share of the patients this party holds"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> VerticalBuiltinData:
        if self.index >= self.parties:
            raise ValueError(f"index: {self.index} is out of range for parties={self.parties}")
        if self.dataset == "synthetic-cxr" and self.parties != 2:
            raise ValueError(
                "parties: synthetic-cxr is held by 2 parties (a clinical table and the images), "
                f"not {self.parties}"
            )
        return self
