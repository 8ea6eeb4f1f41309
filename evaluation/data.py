"""Loading a task's rows (Hub or a local copy) and turning each row into a model-ready sample.

Images are read lazily and per sample (image columns are cast to `decode=False`), so one corrupt
image fails one sample, not the whole split.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from PIL import Image

from .flags import samples_for
from .tasks import Task
from .tasks.formats import VISUALS, mmmu_image_fields, text_sample

log = logging.getLogger("evaluation")

VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov", ".gif")


class SampleError(Exception):
    """A sample that cannot be evaluated (bad image, no reference answer, ...)."""


# --------------------------------------------------------------------------- datasets


def _undecoded(ds):
    """Cast every Image column to decode=False: images are decoded per sample, where a failure is caught."""
    from datasets import Image as ImageFeature

    for name, feature in ds.features.items():
        if isinstance(feature, ImageFeature) and feature.decode:
            ds = ds.cast_column(name, ImageFeature(decode=False))
    return ds


def _load_local(path: Path, split: str):
    """A local copy: a `save_to_disk` folder (Dataset or DatasetDict) or a folder of parquet files."""
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        if (path / "state.json").exists() and not json.loads((path / "state.json").read_text()).get("_data_files"):
            raise ValueError(f"{path} is an empty dataset (saved with no rows): write a copy that has rows")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        return ds
    for pattern in (f"{split}/*.parquet", f"{split}-*.parquet", f"{split}*.parquet", "*.parquet", "**/*.parquet"):
        files = sorted(str(f) for f in path.glob(pattern))
        if files:
            return datasets.load_dataset("parquet", data_files={split: files}, split=split)
    raise FileNotFoundError(f"{path} is neither a save_to_disk folder nor holds parquet files")


def local_path(data_dir: str | os.PathLike, name: str, dataset_id: str | None = None) -> Path | None:
    """Where a local copy of `name` (a task name, or a dataset id like lmms-lab-encoder/DocVQA) lives under data_dir."""
    root = Path(data_dir)
    for candidate in (root / name, *( [root / dataset_id, root / dataset_id.replace("/", "__")] if dataset_id else [])):
        if candidate.is_dir():
            return candidate
    return None


def load_rows(task: Task, data_dir: str | None = None, suffix: str = "", dataset=None, config=None, split=None,
              n: int | None = None):
    """The task's split as a datasets.Dataset with undecoded images: from data_dir when a copy is there, else
    drawn by the task's builder (synthetic benchmarks; the first `n` rows, all when None), else from the Hub."""
    from .tasks.synthetic import builder

    dataset, config, split = dataset or task.dataset, config if config is not None else task.config, split or task.split
    build = None if suffix else builder(task)
    if data_dir:
        path = local_path(data_dir, task.name + suffix, dataset)
        if path is not None:
            return _undecoded(_load_local(path, split))
        if build is None:
            raise FileNotFoundError(
                f"no local copy of {task.name}{suffix} under {data_dir}: expected {Path(data_dir) / (task.name + suffix)} "
                "(a save_to_disk folder or parquet files)"
            )
    if build is not None:
        return _undecoded(build(split, n))
    if Path(dataset).is_dir():  # an --include_path YAML's dataset_path may be a local copy
        return _undecoded(_load_local(Path(dataset), split))
    import datasets

    errors = []
    for dataset_id in (dataset, *([] if suffix else task.mirrors)):
        try:
            return _undecoded(datasets.load_dataset(dataset_id, config, split=split))
        except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
            errors.append(f"{dataset_id}: {type(exc).__name__}: {exc}")
    raise RuntimeError(f"could not load {task.name} ({config or 'default'}/{split}): " + " | ".join(errors))


# --------------------------------------------------------------------------- visuals


def decode_image(value) -> Image.Image:
    """A PIL RGB image from a datasets Image value ({bytes, path}), a PIL image, bytes or a path."""
    try:
        if value is None:
            raise SampleError("the image is missing")
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise SampleError("the image has neither bytes nor a path")
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise SampleError(f"cannot read an image from a {type(value).__name__}")
        image.load()
        return image.convert("RGB")
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise SampleError(f"corrupt image: {type(exc).__name__}: {exc}") from exc


def _uniform(n: int, k: int) -> list[int]:
    if n <= 0:
        raise SampleError("the video has no frames")
    k = min(k, n)
    return sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)}) if k > 1 else [0]


def load_video_frames(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """`num_frames` uniformly spaced RGB frames of a video file, an animated GIF or a folder of frame images.

    The even count Qwen2-VL's temporal patches need is kept by repeating the last frame.
    """
    path = Path(path)
    frames: list[Image.Image] = []
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
            frames = [decode_image(str(files[i])) for i in _uniform(len(files), num_frames)]
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                n = getattr(gif, "n_frames", 1)
                for i in _uniform(n, num_frames):
                    gif.seek(i)
                    frames.append(gif.convert("RGB"))
        else:
            try:
                import av  # noqa: F401
            except ImportError as exc:
                raise SampleError(f"decoding {path.suffix} videos needs PyAV (pip install av)") from exc
            import av

            with av.open(str(path)) as container:
                decoded = [f.to_image() for f in container.decode(video=0)]
            frames = [decoded[i].convert("RGB") for i in _uniform(len(decoded), num_frames)]
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SampleError(f"unreadable video {path}: {type(exc).__name__}: {exc}") from exc
    if len(frames) % 2:
        frames.append(frames[-1].copy())
    return frames


def find_video(video_dirs: list[Path], video_id: str) -> Path:
    for directory in video_dirs:
        if (directory / video_id).is_dir():
            return directory / video_id
        for ext in VIDEO_EXTENSIONS:
            if (directory / f"{video_id}{ext}").exists():
                return directory / f"{video_id}{ext}"
    raise SampleError(f"video {video_id!r} not found in {[str(d) for d in video_dirs]}")


def video_dirs_for(task: Task, data_dir: str | None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs += [Path(data_dir) / f"{task.name}_videos", Path(data_dir) / task.name / "videos"]
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs += [hf_home / task.name / "data", hf_home / "videomme" / "data"]
    return dirs


# --------------------------------------------------------------------------- samples


class TaskData:
    """A task's rows plus what is needed to build samples from them (joined images, video folders)."""

    def __init__(self, task: Task, data_dir: str | None = None, limit: int | float | None = None, num_frames: int = 16):
        self.task = task
        # a builder draws only the rows a count asks for; a fraction needs the split's size first
        self.rows = load_rows(task, data_dir, n=limit if isinstance(limit, int) else None)
        if limit is not None:
            self.rows = self.rows.select(range(samples_for(limit, len(self.rows))))
        if len(self.rows) == 0:
            raise ValueError(f"{task.name} has no rows in its {task.split!r} split")
        self.num_frames = num_frames
        self.image_index = None
        if task.image_join:
            dataset, config, split, key, _ = task.image_join
            images = load_rows(task, data_dir, suffix="_images", dataset=dataset, config=config, split=split)
            self._join_table = images
            self.image_index = {str(k): i for i, k in enumerate(images[key])}
        self.video_dirs = video_dirs_for(task, data_dir) if task.video else []

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, doc_id: int) -> dict:
        return self.rows[doc_id]

    def _images(self, row) -> list[Image.Image]:
        task = self.task
        if task.image_join:
            key_here = task.image_join[4]
            index = self.image_index.get(str(row[key_here]))
            if index is None:
                raise SampleError(f"image {row[key_here]!r} is not in the image table")
            return [decode_image(self._join_table[index]["image"])]
        if task.image is None:
            return []
        if task.image in VISUALS:  # an --include_path YAML's doc_to_visual, given the row with its images decoded
            return [decode_image(v) for v in VISUALS[task.image](self.decoded(row))]
        if task.image == "image_<n>":  # MMMU: the images its prompt mentions, as lmms-eval's doc_to_visual
            return [decode_image(row.get(name)) for name in mmmu_image_fields(task, row)]
        value = row.get(task.image)
        if isinstance(value, list):
            return [decode_image(v) for v in value]
        return [decode_image(value)]

    def decoded(self, row: dict) -> dict:
        """The row as lmms-eval's functions see it: image columns as PIL images."""
        from datasets import Image as ImageFeature

        images = {k for k, f in self.rows.features.items() if isinstance(f, ImageFeature)}
        return {k: decode_image(v) if k in images and v is not None else v for k, v in row.items()}

    def sample(self, doc_id: int, family: str = "default") -> dict:
        """The sample `doc_id`: prompt text, visuals, references, metadata; SampleError when unusable."""
        task = self.task
        try:
            row = self.row(doc_id)
        except Exception as exc:  # noqa: BLE001 - an unreadable row fails that sample only
            raise SampleError(f"unreadable row: {type(exc).__name__}: {exc}") from exc
        try:
            sample = text_sample(task, row, family, doc_id)
        except (ValueError, TypeError, KeyError, SyntaxError) as exc:
            raise SampleError(f"bad row: {type(exc).__name__}: {exc}") from exc
        if not sample["answers"]:
            raise SampleError("the sample has no reference answer")
        images, video = [], None
        if task.video:
            video = load_video_frames(find_video(self.video_dirs, str(row[task.video_field])), self.num_frames)
        else:
            images = self._images(row)
        return dict(sample, images=images, video=video)
