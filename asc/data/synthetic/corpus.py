"""Writing a synthetic corpus in the TAU Urban Acoustic Scenes 2020 or 2022 Mobile development layout.

``synthesize`` is idempotent: recipes call it unconditionally, and an existing corpus made from the
same configuration is reused as it is. Each segment is rendered from its own random stream, so the
process pool changes only the speed, never a byte of the output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from asc import __version__
from asc.audio import write_audio
from asc.data.clips import TAU_SCENES
from asc.data.synthetic.config import SUBSET_PERCENTS, SynthConfig
from asc.data.synthetic.devices import ALL_DEVICES, Device, make_devices, record
from asc.data.synthetic.plan import EVALUATE, TRAIN, SegmentPlan, plan_segments
from asc.data.synthetic.rng import Stream, stream_rng
from asc.data.synthetic.scenes import render_scene
from asc.data.synthetic.subsets import choose_subsets
from asc.errors import DatasetError
from asc.io import atomic_write_json, atomic_write_text, make_dir

FORMAT = "asc-synthetic-scenes"
FORMAT_VERSION = 2  # bump whenever the same config would render different audio
MANIFEST = "synth.json"
TABLE = "clips.csv"  #: the plain-table layout's one table
_MARGIN_SECONDS = 0.25  # rendered on both sides of a clip: room for device offsets and filter tails
SUBSET_DIR = "split_setup"  #: where the DCASE 2024 baseline keeps split5.csv … split100.csv
_OWNED = ("audio", "evaluation_setup", SUBSET_DIR, "meta.csv", TABLE, MANIFEST)
_TRAIN_FOLDS = 4  # the table layout deals training segments into folds 1-4; evaluation is fold 5

Layout = Literal["tau", "table"]
LAYOUTS: tuple[str, ...] = ("tau", "table")

Counts = dict[str, dict[str, int]]


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    counts: Counts  # split -> device -> clips
    generated: bool  # False when an identical corpus was already there

    @property
    def total(self) -> int:
        return sum(sum(devices.values()) for devices in self.counts.values())

    def __str__(self) -> str:
        action = "generated" if self.generated else "already present, reused"
        splits = "; ".join(
            f"{split} {sum(devices.values())} ({', '.join(f'{d} {n}' for d, n in devices.items())})"
            for split, devices in self.counts.items()
        )
        return f"{self.root}: synthetic corpus {action}: {splits}"


@dataclass(frozen=True)
class _Row:
    filename: str
    scene: str
    identifier: str
    device: str
    split: str
    segment: str  #: the recorded segment (every device, every 1-s piece of it)

    @property
    def recording(self) -> str:
        """One device's recording of the segment: the unit a training subset keeps or drops whole."""
        return f"{self.segment}-{self.device}"


def synthesize(out: str | Path, config: SynthConfig, *, progress: bool = True,
               layout: Layout = "tau") -> SynthSummary:
    """Write (or reuse) the corpus for ``config`` in ``out``.

    ``layout="table"`` writes one plain ``clips.csv`` (``filename,scene_label,device,fold``; folds
    1-4 hold the training segments, fold 5 the evaluation split) instead of the TAU tables, the
    shape of a user's own collection (docs/datasets.md). ``config.segment_seconds`` cuts every
    recording into files of that length named like TAU 2022 (``…-<segment>-<piece>-<device>.wav``)
    and, in the TAU layout, adds the DCASE 2024 subsets ``split_setup/split{5,10,25,50,100}.csv``.
    """
    if layout not in LAYOUTS:
        raise DatasetError(out, f"unknown layout {layout!r}", f"choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    previous = _previous_manifest(out)
    if previous is not None:
        if _is_complete_copy(out, previous, config, layout):
            return SynthSummary(out, previous["counts"], generated=False)
        _remove_corpus(out)
    devices = make_devices(config.seed, config.sample_rate, config.ir_dir, config.ir_devices)
    plans = plan_segments(config)
    make_dir(out)
    atomic_write_json(out / MANIFEST, _manifest(config, devices, None, layout))  # marks the folder ours
    rows = _render_all(out, config, plans, devices, progress)
    if layout == "table":
        _write_plain_table(out, rows)
    else:
        _write_tables(out, rows)
        if config.segment_seconds is not None:
            _write_subsets(out, rows, config.seed)
    counts = _counts(rows)
    atomic_write_json(out / MANIFEST, _manifest(config, devices, counts, layout))
    return SynthSummary(out, counts, generated=True)


def _previous_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a corpus already in ``out``; None for a missing or empty folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DatasetError(out, "exists and is not a folder", "choose a folder for the synthetic corpus")
    if not any(out.iterdir()):
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(
            out, "folder is not empty and holds no synthetic corpus (no valid synth.json)",
            "choose an empty or new folder",
        )
    return manifest


def _is_complete_copy(out: Path, manifest: dict[str, Any], config: SynthConfig, layout: Layout) -> bool:
    stored = dict(manifest.get("config") or {})
    stored.pop("workers", None)
    if stored.get("segment_seconds") is None:  # like content_dict: uncut corpora of any version compare equal
        stored.pop("segment_seconds", None)
    wanted = json.loads(json.dumps(config.content_dict()))
    counts = manifest.get("counts")
    if manifest.get("format_version") != FORMAT_VERSION or stored != wanted or not counts:
        return False
    if manifest.get("layout", "tau") != layout:
        return False
    setup = out / "evaluation_setup"
    tables = ([out / TABLE] if layout == "table" else
              [out / "meta.csv", *(setup / f"fold1_{s}.csv" for s in ("train", "evaluate", "test"))])
    if layout != "table" and config.segment_seconds is not None:
        tables += [subset_path(out, percent) for percent in SUBSET_PERCENTS]
    expected = sum(sum(devices.values()) for devices in counts.values())
    return all(t.is_file() for t in tables) and sum(1 for _ in (out / "audio").glob("*.wav")) == expected


def _remove_corpus(out: Path) -> None:
    for name in _OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _manifest(config: SynthConfig, devices: dict[str, Device], counts: Counts | None,
              layout: Layout) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "asc_version": __version__,
        "complete": counts is not None,
        "config": config.to_dict(),
        "scenes": list(TAU_SCENES),
        "devices": {name: device.describe() for name, device in devices.items()},
        "counts": counts,
    }


def _render_all(
    out: Path, config: SynthConfig, plans: list[SegmentPlan], devices: dict[str, Device], progress: bool
) -> list[_Row]:
    render = partial(_render_segment, root=out, config=config, devices=devices)
    bar = tqdm(total=len(plans), desc="synthesizing", unit="segment", disable=not progress)
    rows: list[_Row] = []
    with _mapper(config.workers, len(plans)) as mapper, bar:
        for segment_rows in mapper(render, plans):
            rows.extend(segment_rows)
            bar.update()
    return rows


@contextmanager
def _mapper(workers: int, jobs: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """``map`` in this process, or an ordered ``map`` over a process pool."""
    if workers == 1:
        yield map
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            yield partial(pool.map, chunksize=max(1, jobs // (workers * 16)))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, do not render the rest
            raise


def _render_segment(
    plan: SegmentPlan, *, root: Path, config: SynthConfig, devices: dict[str, Device]
) -> list[_Row]:
    """Render one segment once and write every device's recording of it (cut into pieces for TAU 2022)."""
    sr = config.sample_rate
    n = int(round(config.clip_seconds * sr))
    margin = int(_MARGIN_SECONDS * sr)
    location_rng = stream_rng(config.seed, Stream.LOCATION, plan.location)
    segment_rng = stream_rng(config.seed, Stream.SEGMENT, plan.index)
    clean = render_scene(plan.scene, n + 2 * margin, sr, location_rng, segment_rng)
    rows = []
    for device in plan.devices:
        rng = stream_rng(config.seed, Stream.RECORDING, plan.index, ALL_DEVICES.index(device))
        audio = record(devices[device], clean, sr, n, margin, rng)
        if config.segment_seconds is None:
            pieces = [(plan.filename(device), audio)]
        else:
            step = round(config.segment_seconds * sr)
            pieces = [(plan.piece_filename(device, k), audio[k * step:(k + 1) * step]) for k in range(config.pieces)]
        for filename, piece in pieces:
            write_audio(root / filename, piece, sr, subtype="PCM_16")
            rows.append(_Row(filename, plan.scene, plan.identifier, device, plan.split, plan.stem))
    return rows


def _write_tables(out: Path, rows: list[_Row]) -> None:
    rows = sorted(rows, key=lambda r: r.filename)
    evaluate = [r for r in rows if r.split == EVALUATE]

    def table(header: str, lines: list[str]) -> str:
        return "\n".join([header, *lines]) + "\n"

    atomic_write_text(out / "meta.csv", table(
        "filename\tscene_label\tidentifier\tsource_label",
        [f"{r.filename}\t{r.scene}\t{r.identifier}\t{r.device}" for r in rows],
    ))
    setup = out / "evaluation_setup"
    atomic_write_text(setup / "fold1_train.csv", table(
        "filename\tscene_label", [f"{r.filename}\t{r.scene}" for r in rows if r.split == TRAIN]
    ))
    atomic_write_text(setup / "fold1_evaluate.csv", table(
        "filename\tscene_label", [f"{r.filename}\t{r.scene}" for r in evaluate]
    ))
    atomic_write_text(setup / "fold1_test.csv", table("filename", [r.filename for r in evaluate]))


def subset_path(out: Path, percent: int) -> Path:
    return out / SUBSET_DIR / f"split{percent}.csv"


def _write_subsets(out: Path, rows: list[_Row], seed: int) -> None:
    """``split{p}.csv`` (``filename scene_label``, tab-separated like fold1_train.csv) per percentage."""
    train = sorted((r for r in rows if r.split == TRAIN), key=lambda r: r.filename)
    subsets = choose_subsets([(r.recording, r.scene, r.device) for r in train], SUBSET_PERCENTS, seed)
    for percent, chosen in subsets.items():
        lines = [f"{r.filename}\t{r.scene}" for r in train if r.recording in chosen]
        atomic_write_text(subset_path(out, percent), "\n".join(["filename\tscene_label", *lines]) + "\n")


def _write_plain_table(out: Path, rows: list[_Row]) -> None:
    """``clips.csv``: comma-separated, device in a column, folds by segment (a segment's recordings
    by every device share a fold, so no fold trains on a clip another fold tests)."""
    rows = sorted(rows, key=lambda r: r.filename)
    segments = sorted({r.segment for r in rows if r.split == TRAIN})
    fold = {segment: index % _TRAIN_FOLDS + 1 for index, segment in enumerate(segments)}
    lines = [f"{r.filename},{r.scene},{r.device},{fold[r.segment] if r.split == TRAIN else _TRAIN_FOLDS + 1}"
             for r in rows]
    atomic_write_text(out / TABLE, "\n".join(["filename,scene_label,device,fold", *lines]) + "\n")


def _counts(rows: list[_Row]) -> Counts:
    counts: Counts = {}
    for split in (TRAIN, EVALUATE):
        present = [r.device for r in rows if r.split == split]
        counts[split] = {d: present.count(d) for d in ALL_DEVICES if d in present}
    return counts
