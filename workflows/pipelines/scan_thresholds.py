"""Per-category thresholds the user gives `scan`: a file (`--thresholds`, JSON or YAML
`{category: threshold}`) or an earlier scan's calibration (`--thresholds-from`, its output URL or its
`summary.json` / `calibration.json`).

Precedence per category: the file, then the earlier run, then this scan's calibration on `--normals`
(or `--threshold` for every category); a category none of them covers has no threshold (scored, never
flagged). Everything is read and checked on the driver before Ray starts (`check_threshold_options`);
a bad file is a `ConfigError` (one line, exit 2). Categories of the file that the input does not have
are refused (a typo would otherwise silently fall back); an earlier run's other categories are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math

from workflows import storage
from workflows.config import ConfigError
from workflows.pipelines.calibration import Calibration, CategoryThreshold

RUN_FILES = ("calibration.json", "summary.json")  # looked for under an earlier scan's output URL
FILE_SUFFIXES_JSON = (".json",)  # anything else is read as YAML (a superset of JSON)


def _where(option: str, url: str) -> str:
    return f"{option} {storage.redact(url)}"


def read_thresholds_file(url: str) -> dict[str, float]:
    """{category: threshold} from a JSON or YAML mapping; ConfigError for anything else."""
    where = _where("--thresholds", url)
    try:
        text = storage.read_bytes(url).decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - missing, unreadable, not UTF-8: the user's file
        raise ConfigError(f"unreadable thresholds file ({where}): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}; give a readable JSON or YAML "
                          "file mapping category to threshold") from None
    try:
        if url.lower().endswith(FILE_SUFFIXES_JSON):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parser error
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"unparsable thresholds file ({where}): {first}; write it as JSON or YAML "
                          "{category: threshold}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"bad thresholds file ({where}): expected a non-empty mapping category -> "
                          f"threshold, got {type(data).__name__}; write it as {{category: threshold}}")
    out: dict[str, float] = {}
    for category, value in data.items():
        if not isinstance(category, str) or not category:
            raise ConfigError(f"bad thresholds file ({where}): category {category!r} is not a name; "
                              "use the category names of the input (its first directory level)")
        number = _number(value)
        if number is None:
            raise ConfigError(f"bad threshold ({where}, category {category}): {value!r} is not a finite "
                              "number; give a score threshold such as 0.85")
        out[category] = number
    return out


def _number(value) -> float | None:
    """A finite float, or None. Text that reads as a number counts: YAML 1.1 (PyYAML) reads `5e-1` as
    text."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_earlier_run(url: str) -> dict[str, CategoryThreshold]:
    """The thresholds an earlier scan used, by category (those it had none for are left out)."""
    return usable_thresholds(read_earlier_calibration(url))


def usable_thresholds(calibration: Calibration) -> dict[str, CategoryThreshold]:
    return {name: entry for name, entry in calibration.categories.items()
            if isinstance(entry.threshold, int | float) and math.isfinite(entry.threshold)}


def read_earlier_calibration(url: str) -> Calibration:
    """An earlier scan's calibration: `calibration.json` or `summary.json` under its output URL, or the
    file itself; ConfigError when there is none."""
    where = _where("--thresholds-from", url)
    candidates = [url] if url.endswith(".json") else [storage.join(url, name) for name in RUN_FILES]
    for candidate in candidates:
        try:
            if not storage.exists(candidate):
                continue
            data = storage.read_json(candidate)
        except Exception as exc:  # noqa: BLE001 - unreadable or not JSON
            raise ConfigError(f"unreadable earlier scan ({where}): {type(exc).__name__}; give the output "
                              "URL of an earlier scan (it holds calibration.json)") from None
        section = data.get("calibration", data) if isinstance(data, dict) else None
        try:
            calibration = Calibration.from_dict(section)
        except Exception:  # noqa: BLE001 - not a calibration
            raise ConfigError(f"not a scan calibration ({storage.redact(candidate)}): no per-category "
                              "thresholds in it; give the output URL of an earlier scan") from None
        return calibration
    raise ConfigError(f"no earlier scan ({where}): neither {' nor '.join(RUN_FILES)} is there; give the "
                      "output URL of an earlier scan")


def input_categories(input_url: str, *, category: str | None, split: str) -> set[str]:
    """The categories a scan of `input_url` will see, without listing the whole archive: `--category`,
    the Parquet partitions of `split`, or the first directory level of a raw prefix."""
    from workflows.pipelines.raw_images import NO_CATEGORY
    from workflows.pipelines.scan import is_parquet_dataset

    if category:
        return {category}
    if is_parquet_dataset(input_url):
        from workflows.datasets.reader import list_partitions

        return {c for _, c, s in list_partitions(input_url) if s == split}
    fs, path = storage.resolve(input_url)
    found = set()
    for entry in fs.ls(path, detail=True):
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        found.add(name if entry.get("type") == "directory" else NO_CATEGORY)
    return found


@dataclasses.dataclass(frozen=True)
class GivenThresholds:
    """What `--thresholds` and `--thresholds-from` give, read and checked once on the driver."""

    file: dict[str, float] = dataclasses.field(default_factory=dict)
    run: dict[str, CategoryThreshold] = dataclasses.field(default_factory=dict)

    def covered(self) -> set[str]:
        return set(self.file) | set(self.run)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def check_same_model(calibration: Calibration, config, url: str) -> None:
    """Scores of another method or backbone are on another scale: their thresholds mean nothing here."""
    from dataclasses import asdict

    for part in ("method", "backbone"):
        ours = json.loads(_canonical(asdict(getattr(config, part))))
        if _canonical(getattr(calibration, part)) != _canonical(ours):
            raise ConfigError(f"thresholds of another {part} ({_where('--thresholds-from', url)}): that scan "
                              f"used {part} {_canonical(getattr(calibration, part))[:200]}, this one "
                              f"{_canonical(ours)[:200]}; scan with the same {part} or calibrate anew "
                              "(--normals)")


def check_threshold_options(options, config=None) -> GivenThresholds:
    """Read `options.thresholds_file` / `options.thresholds_from` (a `ScanOptions`) and check the file's
    categories against the input's and (given the RunConfig) that the earlier scan used the same method
    and backbone; ConfigError on the first problem."""
    run = {}
    if options.thresholds_from:
        earlier = read_earlier_calibration(options.thresholds_from)
        if config is not None:
            check_same_model(earlier, config, options.thresholds_from)
        run = usable_thresholds(earlier)
    given = GivenThresholds(
        read_thresholds_file(options.thresholds_file) if options.thresholds_file else {}, run)
    if given.file:
        known = input_categories(options.input, category=options.category, split=options.split)
        unknown = sorted(set(given.file) - known)
        if unknown:
            raise ConfigError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                f"({_where('--thresholds', options.thresholds_file)}): the input has "
                f"{', '.join(sorted(known)) or 'no categories'}; fix the names or remove those entries")
    return given


def apply_given(calibration: Calibration, given: GivenThresholds, categories: list[str], *,
                thresholds_file: str | None, thresholds_from: str | None) -> Calibration:
    """Override `calibration` per category: the earlier run's thresholds, then the file's (highest)."""
    for name in categories:
        if name in given.run:
            earlier = given.run[name]
            calibration.categories[name] = dataclasses.replace(earlier, category=name, source="run")
        if name in given.file:
            calibration.categories[name] = CategoryThreshold(name, given.file[name], "file")
    calibration.thresholds_file = storage.redact(thresholds_file) if thresholds_file else None
    calibration.thresholds_from = storage.redact(thresholds_from) if thresholds_from else None
    return calibration


def describe_origins(calibration: Calibration) -> dict[str, dict]:
    """summary.json's `thresholds`: per category the threshold used and where it came from, in words."""
    words = {
        "file": f"--thresholds {calibration.thresholds_file}",
        "run": f"--thresholds-from {calibration.thresholds_from}",
        "fpr": f"calibrated at FPR {calibration.target_fpr} on --normals",
        "fixed": "--threshold (every category)",
        "none": "no threshold (no entry, no calibration normals, no --threshold): scored, never flagged",
    }
    return {name: {"threshold": entry.threshold, "source": entry.source, "origin": words.get(entry.source,
                                                                                            entry.source)}
            for name, entry in sorted(calibration.categories.items())}
