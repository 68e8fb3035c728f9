"""Training-split augmentation: Albumentations 2.0.8 pipelines built from `conf/augmentation/<name>.yaml`.

A pipeline file is a list of transforms, each `{name: <Albumentations class>, <argument>: <value>, ...}`:

    transforms:
      - {name: Pad, padding: 4, border_mode: 0, fill: 0}
      - {name: RandomCrop, height: input, width: input}   # `input`: the dataset's image height / width
      - {name: HorizontalFlip, p: 0.5}

`build_pipeline` is the one place a pipeline is made (the batched on-device path reads the same specs). An unknown
transform, an argument the class does not take, or a value it rejects is a ConfigError naming
`augmentation.transforms[i]` (Albumentations itself only warns about unknown arguments). `BatchAugment` applies
the pipeline per sample to an (N, C, H, W) batch in its stored dtype: uint8 stays uint8 (0..255); float data is
divided by the data module's `scale` to [0, 1] (Albumentations' float convention) and multiplied back.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

import reglab  # noqa: F401  (NO_ALBUMENTATIONS_UPDATE before albumentations is imported)
from reglab.data.loader import AUGMENTATION, epoch_seed
from reglab.errors import ConfigError

# Transforms that change what a handwritten digit means (the lecture's OCR caveat: b/d, 6/9).
FLIPS = {"HorizontalFlip", "VerticalFlip", "Transpose", "D4", "RandomRotate90", "SquareSymmetry"}
ROTATION_ARGS = {"Rotate": "limit", "SafeRotate": "limit", "ShiftScaleRotate": "rotate_limit", "Affine": "rotate"}
LARGE_ROTATION_DEG = 30.0
DIGIT_DATASETS = ("digits", "mnist")
INPUT_SIZE = "input"  # placeholder for the image's own height / width


def _specs(transforms: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Plain dicts (Hydra gives DictConfig/ListConfig), each checked to have a `name`."""
    from omegaconf import OmegaConf

    if transforms is None:
        return []
    if OmegaConf.is_config(transforms):
        transforms = OmegaConf.to_container(transforms, resolve=True)
    if not isinstance(transforms, (list, tuple)):
        raise ConfigError(f"augmentation.transforms must be a list of {{name: ..., arg: value}}, got {transforms!r}")
    specs = []
    for i, spec in enumerate(transforms):
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"augmentation.transforms[{i}]={spec!r} needs a `name:` (an Albumentations class)")
        specs.append(dict(spec))
    return specs


def _resolve_size(spec: dict[str, Any], image_hw: tuple[int, int] | None, where: str) -> dict[str, Any]:
    out = dict(spec)
    for key, value in spec.items():
        if value == INPUT_SIZE:
            if image_hw is None or key not in ("height", "width", "min_height", "min_width"):
                raise ConfigError(f"{where}.{key}={INPUT_SIZE!r} is only allowed for height/width arguments")
            out[key] = image_hw[0] if "height" in key else image_hw[1]
    return out


def build_transform(spec: Mapping[str, Any], index: int = 0, image_hw: tuple[int, int] | None = None):
    """One Albumentations transform from `{name: ..., **kwargs}`; every problem is a ConfigError."""
    import albumentations as A

    where = f"augmentation.transforms[{index}]"
    spec = _resolve_size(dict(spec), image_hw, where)
    name = spec.pop("name")
    cls = getattr(A, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        close = difflib.get_close_matches(name, [n for n in dir(A) if n[:1].isupper()], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{where}.name={name!r} is not an Albumentations transform{hint}")
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [k for k in params if k not in ("self", "args", "kwargs", "strict")]
    if not takes_any:
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: {name} takes no argument {unknown[0]!r}{hint}; it takes {', '.join(allowed)}")
    try:
        with warnings.catch_warnings():
            # Albumentations warns (and carries on) about deprecated or ignored arguments: refuse them instead.
            warnings.simplefilter("error")
            return cls(**spec, strict=True)
    except Exception as e:  # pydantic ValidationError, ValueError, TypeError, or a warning turned error
        detail = " ".join(str(e).split())
        raise ConfigError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in spec.items())}) is invalid: "
                          f"{detail[:300]}") from None


def build_pipeline(transforms, seed: int | None = None, image_hw: tuple[int, int] | None = None,
                   force_apply: bool = False):
    """A.Compose of the specs, seeded. force_apply sets every p to 1 (for previews of what each transform does)."""
    import albumentations as A

    specs = _specs(transforms)
    built = [build_transform({**s, "p": 1.0} if force_apply else s, i, image_hw) for i, s in enumerate(specs)]
    pipeline = A.Compose(built)
    if seed is not None:
        seed_pipeline(pipeline, seed)
    return pipeline


def seed_pipeline(pipeline, seed: int) -> None:
    """Seed a Compose so that each transform draws from a stream of its own, derived from (seed, position).
    Albumentations 2.0.8's Compose.set_random_seed (and Compose(seed=...)) gives every transform the same seed, so
    all of them draw the same numbers: in cifar_standard the flip of image 2j followed image j's crop offset (94% of
    images), and figure_9_1's transforms were applied in fixed pairs."""
    pipeline.set_random_seed(seed)
    for i, t in enumerate(pipeline.transforms):
        own = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        if hasattr(t, "transforms"):  # a nested composition (OneOf, Sequential): its transforms apart too
            seed_pipeline(t, own)
        else:
            t.set_random_seed(own)


def label_changing(transforms) -> list[str]:
    """Names of flips and rotations over LARGE_ROTATION_DEG in the pipeline."""
    found = []
    for spec in _specs(transforms):
        name = spec["name"]
        if name in FLIPS:
            found.append(name)
        elif name in ROTATION_ARGS and ROTATION_ARGS[name] in spec:
            limit = spec[ROTATION_ARGS[name]]
            values = limit if isinstance(limit, (list, tuple)) else [limit]
            if any(isinstance(v, (int, float)) and abs(v) > LARGE_ROTATION_DEG for v in values):
                found.append(f"{name}({ROTATION_ARGS[name]}={limit})")
    return found


def _label(spec: Mapping[str, Any]) -> str:
    args = [k for k in spec if k not in ("name", "p")]
    return f"{spec['name']}\n{', '.join(args[:2])}" if args else spec["name"]


def _to_display(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    return img[..., 0] if img.shape[-1] == 1 else img


def preview_figure(transforms, images: list[tuple[str, np.ndarray]], seed: int = 0):
    """A matplotlib Figure: one row per (title, HWC image in [0, 1] float or uint8); columns: the original, each
    transform alone (applied with p=1) and the whole pipeline. No pyplot state, so nothing to close."""
    from matplotlib.figure import Figure

    specs = _specs(transforms)
    columns = ["original", *[_label(s) for s in specs], "pipeline"]
    fig = Figure(figsize=(1.6 * len(columns), 1.8 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for r, (title, img) in enumerate(images):
        hw = img.shape[:2]
        outs = [img]
        for i, spec in enumerate(specs):
            # Each transform alone keeps its index so an error names the right list entry.
            single = build_transform({**spec, "p": 1.0}, i, hw)
            outs.append(_compose_one(single, seed)(image=img)["image"])
        outs.append(build_pipeline(specs, seed=seed, image_hw=hw)(image=img)["image"])
        for c, out in enumerate(outs):
            ax = axes[r][c]
            ax.imshow(_to_display(out), cmap="gray" if out.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=8)
    return fig


def _compose_one(transform, seed: int):
    import albumentations as A

    return A.Compose([transform], seed=seed)


def sample_photo(max_side: int = 160) -> np.ndarray:
    """scikit-learn's bundled photo (china.jpg, 427x640 RGB uint8), downscaled so previews stay small."""
    import albumentations as A
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")
    return A.LongestMaxSize(max_size=max_side, p=1.0)(image=img)["image"]


class BatchAugment:
    """(N, C, H, W) tensor -> same shape and dtype, each sample through the pipeline (on CPU, as HWC numpy)."""

    def __init__(self, transforms, image_hw: tuple[int, int], scale: float = 1.0, seed: int | None = None):
        self.specs = _specs(transforms)
        self.image_hw, self.scale, self.seed = tuple(image_hw), float(scale), seed
        self.pipeline = build_pipeline(self.specs, seed=seed, image_hw=self.image_hw)

    def start_epoch(self, epoch: int, rank: int = 0) -> None:
        """Draw this epoch's (and rank's) augmentations from epoch_seed (unseeded pipelines stay unseeded)."""
        if self.seed is not None:
            seed_pipeline(self.pipeline, epoch_seed(self.seed, epoch, rank, AUGMENTATION))

    def __repr__(self) -> str:
        return f"BatchAugment({[s['name'] for s in self.specs]}, image_hw={self.image_hw}, scale={self.scale:g})"

    def to_hwc(self, x: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) tensor in stored units -> (N, H, W, C) numpy in Albumentations units (uint8, or [0,1])."""
        arr = x.detach().cpu().permute(0, 2, 3, 1).numpy()
        return arr if arr.dtype == np.uint8 else (arr / self.scale).astype(np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        arr = self.to_hwc(x)
        outs = [self.pipeline(image=img)["image"] for img in arr]
        shapes = {o.shape for o in outs}
        if shapes != {arr.shape[1:]}:
            raise ConfigError(f"augmentation changes the image shape {arr.shape[1:]} to {sorted(shapes)}: end the "
                              "pipeline with a crop to height: input, width: input")
        out = np.stack(outs)
        if out.dtype != np.uint8:
            out = out * self.scale
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype).contiguous()

    def preview(self, sample: torch.Tensor, seed: int = 0, dataset: str = "dataset sample"):
        """Figure of each transform on the bundled photo and on `sample` (C, H, W) from the data set."""
        img = self.to_hwc(sample.unsqueeze(0))[0]
        return preview_figure(self.specs, [("photo (sklearn)", sample_photo()), (dataset, img)], seed=seed)


def for_datamodule(aug_cfg: Mapping[str, Any] | None, dm, seed: int | None = None) -> BatchAugment | None:
    """The training-split augmentation of `dm` from `cfg.augmentation`, or None for an empty pipeline.
    Sets up `dm` (loads the data) to learn the image size, dtype scale and dataset name."""
    specs = _specs((aug_cfg or {}).get("transforms"))
    if not specs:
        return None
    dm.setup()
    shape = tuple(dm.input_shape)
    if len(shape) != 3:
        raise ConfigError(f"augmentation: data {dm.name} is not images (sample shape {shape}); use augmentation=none")
    risky = label_changing(specs)
    if risky and dm.name in DIGIT_DATASETS:
        warnings.warn(f"augmentation: {', '.join(risky)} on the digit dataset {dm.name!r} can change a label "
                      "(b/d, 6/9: a flipped or rotated digit may be another digit); prefer augmentation=digits_safe",
                      UserWarning, stacklevel=2)
    return BatchAugment(specs, image_hw=shape[1:], scale=dm.scale, seed=seed)


def write_preview(cfg, path) -> Path:
    """PNG grid of cfg.augmentation on the bundled photo and the first training image of cfg.data."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, seed=cfg.seed)
    aug = for_datamodule(cfg.get("augmentation"), dm, seed=cfg.seed)
    if aug is None:
        raise ConfigError("augmentation has no transforms to preview: pick one, e.g. augmentation=figure_9_1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aug.preview(dm.train_x[0], dataset=f"{dm.name} sample").savefig(path, dpi=120)
    return path


def preview_for(aug_cfg: Mapping[str, Any] | None, dm):
    """The preview Figure of `cfg.augmentation` for a set-up data module, or None without transforms (also when
    the batched on-device version does the training-time work)."""
    specs = _specs((aug_cfg or {}).get("transforms"))
    if not specs or len(dm.input_shape) != 3:
        return None
    aug = BatchAugment(specs, image_hw=tuple(dm.input_shape[1:]), scale=dm.scale)
    return aug.preview(dm.train_x[0].cpu(), dataset=f"{dm.name} sample")
