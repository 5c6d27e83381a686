"""`predict`: score a handful of images on this machine (no Ray, no cluster) against a few normal
references, print each score and write overlays and `scores.csv`: what a user does first with a new
category.

Images are read as `scan` reads archives (`raw_images.read_items`: regular files inside the given
folder only, bounded in bytes and time; decoded with scan's pixel limit) and scored by
`local_scoring.LocalScorer`, the evaluate pipeline's model, bank and batch loop in-process. References
are a folder of normal images (all of them, or `k` chosen as `index` chooses) or a dataset's normal
`train` images of one category (`k` chosen exactly as `index` does, so the scores equal `evaluate`'s).
Methods with whole-set normalisation (ResAD++'s `test_set`) run in their batch-independent mode.
Every problem with the user's input raises `ConfigError` before any model is built where possible.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from workflows import storage
from workflows.config import ConfigError, RunConfig
from workflows.pipelines.local_scoring import LocalScorer, LocalScores
from workflows.pipelines.raw_images import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S, display_key, read_items
from workflows.pipelines.scoring import ScoringJob

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PREDICT_MAX_PIXELS = 16 * 2**20  # as scan's default (4096 x 4096)
FOLDER_DATASET = "predict"  # bank header of folder references
SCORES_CSV = "scores.csv"


@dataclass(frozen=True)
class PredictOptions:
    """What `residual-ad predict` was asked (URLs absolute)."""

    inputs: str
    references: str
    output: str
    category: str | None = None  # dataset references: the category
    dataset: str | None = None  # dataset references: the dataset (needed when several have the category)
    k: int | None = None  # references: dataset default index.shots[0], folder default all
    threshold: float | None = None
    max_pixels: int = PREDICT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


@dataclass
class LoadedImage:
    key: str  # path relative to the folder given (the file name for a single file)
    image_id: str  # content id (as ingest and scan name images)
    image: object  # PIL RGB


@dataclass
class Prediction:
    path: str
    image_id: str
    score: float
    anomalous: bool | None
    overlay: str  # URL of the overlay PNG


@dataclass
class PredictResult:
    predictions: list[Prediction]
    reference_ids: list[str]
    references: str  # what the references were, in words
    mode: str  # how maps were normalised (local_scoring.MODE_*)
    output: str
    branch_scores: dict[str, list[float]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading the user's files
def _listing(url: str, what: str) -> tuple[str, list[tuple[str, int | None]]]:
    """(folder URL, [(key, listed size)]) of the image files at `url`: a folder (walked, image suffixes
    only, hidden names skipped) or one file (read whatever its suffix)."""
    from workflows.ingest.source import SourceTree

    fs, path = storage.resolve(url)
    where = storage.redact(url)
    if storage.with_retries(lambda: fs.isdir(path), what=f"list {where}"):
        entries = [(e.rel, e.size) for e in SourceTree(url).walk_files(hidden=False)
                   if e.rel.lower().endswith(IMAGE_SUFFIXES)]
        if not entries:
            raise ConfigError(f"no images ({what}): {where} holds no {'/'.join(IMAGE_SUFFIXES)} files; give "
                              "an image or a folder of images")
        return url, entries
    if not storage.exists(url):
        raise ConfigError(f"not found ({what}): nothing at {where}; give an image or a folder of images")
    parent, name = posixpath.split(url.rstrip("/"))
    return parent or ".", [(name, None)]


def read_images(url: str, what: str, options: PredictOptions) -> list[LoadedImage]:
    """Every image at `url`, decoded (RGB); an unreadable one raises `ConfigError` naming it."""
    from residual_core.images import ImageDecodeError, decode_image_reduced
    from workflows.datasets.schema import content_id

    root, entries = _listing(url, what)
    images = []
    for key, data, error in read_items(root, entries, max_bytes=options.max_bytes,
                                       timeout_s=options.read_timeout_s):
        where = storage.redact(storage.join(root, display_key(key)))
        if error is None:
            try:
                image, _ = decode_image_reduced(data, max_pixels=options.max_pixels, reduce_over_limit=True)
            except ImageDecodeError as exc:
                error = exc.reason
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
                error = f"undecodable: {type(exc).__name__}: {exc}"
        if error is not None:
            raise ConfigError(f"unreadable image ({what}: {where}): {' '.join(str(error).split())[:300]}; "
                              "fix or remove it")
        images.append(LoadedImage(display_key(key), content_id(data), image))
    return images


# ----------------------------------------------------------------------------- references
def _is_dataset(url: str) -> bool:
    from workflows.datasets.schema import MANIFEST_NAME

    return storage.exists(storage.join(url, MANIFEST_NAME))


def _dataset_of(url: str, options: PredictOptions) -> str:
    """The dataset holding `options.category`'s normal train images (given, or the only one)."""
    from workflows.datasets.reader import list_partitions

    where = storage.redact(url)
    if not options.category:
        raise ConfigError(f"no category (--category): the references {where} are a dataset; name the "
                          "category whose normal train images to use")
    holders = sorted({d for d, c, s in list_partitions(url) if c == options.category and s == "train"})
    if options.dataset:
        holders = [d for d in holders if d == options.dataset]
    if len(holders) == 1:
        return holders[0]
    if not holders:
        raise ConfigError(f"unknown category {options.category!r} (--category): no train images of it in "
                          f"{where}{f' dataset {options.dataset}' if options.dataset else ''}; use a "
                          "category the dataset has")
    raise ConfigError(f"ambiguous category {options.category!r} (--category): datasets {', '.join(holders)} "
                      f"of {where} all have it; add --dataset")


def dataset_references(config: RunConfig, options: PredictOptions) -> tuple[str, str, list[str], int, int]:
    """(dataset, category, reference ids, k, seed): the normal train images `index` would choose."""
    from residual_core.bank import select_reference_ids
    from workflows.pipelines.index import normal_train_ids

    dataset = _dataset_of(options.references, options)
    k, seed = options.k or config.index.shots[0], config.index.seeds[0]
    candidates = normal_train_ids(options.references, dataset, options.category)
    if len(candidates) < k:
        raise ConfigError(f"too few references ({'--k' if options.k else 'index.shots[0]'}={k}): "
                          f"{dataset}/{options.category} has {len(candidates)} normal train images; lower k "
                          "or add normal images")
    return dataset, options.category, select_reference_ids(candidates, k, seed), k, seed


def dataset_reference_images(url: str, dataset: str, category: str, ids: list[str]) -> list:
    """The chosen references decoded (PIL), in the order of `ids` (as `index.read_images` decodes them)."""
    from residual_core.images import decode_image
    from workflows.datasets.reader import read_table

    table = read_table(url, columns=["image_id", "image"],
                       filters=[("dataset", "==", dataset), ("category", "==", category),
                                ("split", "==", "train"), ("image_id", "in", list(ids))])
    by_id = dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True))
    return [decode_image(by_id[i]) for i in ids]


def folder_references(images: list[LoadedImage], options: PredictOptions, seed: int) -> list[LoadedImage]:
    """All distinct images of a reference folder, or `k` of them chosen as `index` chooses."""
    from residual_core.bank import select_reference_ids

    unique = list({i.image_id: i for i in images}.values())
    k = options.k or len(unique)
    if len(unique) < k:
        raise ConfigError(f"too few references (--k={k}): {storage.redact(options.references)} has "
                          f"{len(unique)} distinct images; lower --k or add normal images")
    chosen = set(select_reference_ids([i.image_id for i in unique], k, seed))
    return [i for i in unique if i.image_id in chosen]


# ----------------------------------------------------------------------------- scoring and outputs
def local_scorer(config: RunConfig) -> LocalScorer:
    """The configured method on this machine, its job carrying the backbone's input size and norms."""
    from workflows.pipelines.models import backbone_info, method_preprocess

    job = ScoringJob(job_id="predict", job_url="", backbone=asdict(config.backbone),
                     method=asdict(config.method), banks={}, preprocess=method_preprocess(config.method),
                     device=config.device)
    scorer = LocalScorer(job, batch_size=config.evaluate.batch_size)
    info = backbone_info(scorer.method.backbone)
    scorer.job = replace(job, image_size=info.image_size, mean=info.mean, std=info.std)
    return scorer


def overlay_stem(key: str) -> str:
    """`a/b/img.png` -> `a_b_img` (the image's stem; its folders too when nested)."""
    stem = posixpath.splitext(key)[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.replace("/", "_")) or "image"


def overlay_names(keys: list[str], image_ids: list[str]) -> list[str]:
    """`<stem>.png` per image; stems that two images share (`a.png`, `a.jpg`) get the image id's start."""
    stems = [overlay_stem(key) for key in keys]
    return [f"{stem}_{image_id[:8]}.png" if stems.count(stem) > 1 else f"{stem}.png"
            for stem, image_id in zip(stems, image_ids, strict=True)]


def write_outputs(options: PredictOptions, images: list[LoadedImage], scores: LocalScores,
                  preprocess: str) -> list[Prediction]:
    """`<output>/<stem>.png` overlays (one colour scale for the run) and `<output>/scores.csv`."""
    from residual_core.preprocess import get_preprocess
    from workflows.reports.overlay import overlay_png, run_map_limits

    preset = get_preprocess(preprocess)
    size = scores.maps.shape[-1]
    limits = run_map_limits(list(scores.maps))
    predictions = []
    names = overlay_names([item.key for item in images], [item.image_id for item in images])
    for item, name, score, amap in zip(images, names, scores.scores, scores.maps, strict=True):
        anomalous = None if options.threshold is None else bool(score >= options.threshold)
        verdict = "" if anomalous is None else (
            f" · {'anomalous' if anomalous else 'normal'} (threshold {options.threshold:g})")
        caption = [f"score {float(score):.4g}{verdict}", item.key]
        png = overlay_png(preset.display(item.image, size), np.asarray(amap), limits, caption,
                          marker=options.threshold)
        url = storage.join(options.output, name)
        storage.atomic_write_bytes(url, png)
        predictions.append(Prediction(item.key, item.image_id, float(score), anomalous, url))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "image_id", "score", "anomalous", "overlay"])
    for p in predictions:
        writer.writerow([p.path, p.image_id, repr(p.score), "" if p.anomalous is None else int(p.anomalous),
                         posixpath.basename(p.overlay)])
    storage.atomic_write_bytes(storage.join(options.output, SCORES_CSV), buffer.getvalue().encode())
    return predictions


def run_predict(config: RunConfig, options: PredictOptions) -> PredictResult:
    """Read, check, score, write; see the module doc."""
    from workflows.validate import check_method

    if options.k is not None and options.k < 1:
        raise ConfigError(f"bad k (--k={options.k}): must be >= 1; give a positive number")
    check_method(config.method, "method")
    images = read_images(options.inputs, "images", options)
    if _is_dataset(options.references):
        dataset, category, ids, k, seed = dataset_references(config, options)
        reference_images = dataset_reference_images(options.references, dataset, category, ids)
        described = f"{k} normal train image(s) of {dataset}/{category} (seed {seed})"
    else:
        seed = config.index.seeds[0]
        chosen = folder_references(read_images(options.references, "references", options), options, seed)
        dataset, category = FOLDER_DATASET, options.category or FOLDER_DATASET
        ids, reference_images = [i.image_id for i in chosen], [i.image for i in chosen]
        described = f"{len(ids)} image(s) of {storage.redact(options.references)}"
    scorer = local_scorer(config)
    bank = scorer.build_bank(scorer.prepare(reference_images), image_ids=ids, dataset=dataset,
                             category=category, seed=seed)
    scores = scorer.score(scorer.prepare([i.image for i in images]), bank)
    predictions = write_outputs(options, images, scores, scorer.job.preprocess)
    return PredictResult(predictions, ids, described, scores.mode, options.output,
                         {name: [float(v) for v in values] for name, values in scores.branch_scores.items()})

