"""Data plane at scale (issue 18): ``selectmoe validate-data`` over a generated corpus of N rows laid out as
one file and as 16 files, today's code beside an older commit's, each run its own local Ray.

    .venv/bin/python benchmarks/data_plane_scale.py --rows 1000000 5000000 --baseline ea723d1 \
        --json benchmarks/results/data_plane_scale.json
    .venv/bin/python benchmarks/data_plane_scale.py --rows 2000 --files 4 --split-bytes 100000  # CI size
    .venv/bin/python benchmarks/data_plane_scale.py --select --rows 100000 500000 --json ...  # stage 2
    .venv/bin/python benchmarks/data_plane_scale.py --train-stage pretrain --rows 200000 --baseline f34d3bd^ ...

``--select`` runs ``selectmoe select`` instead (each ``--baseline`` REF's too), with a tiny randomly initialised OLMoE
(built once in the work folder; ``--selector-layers 1`` halves its cost) and ``--select-max-length`` tokens a
row, so that the data plane weighs as much as it can beside scoring (``--num-actors 1 2``: a run per
``scoring.num_actors``, compared with the first): first from scratch, then resumed after every other score file was deleted
(as a crash leaves a run), and checks that the resumed ``selected.jsonl`` is byte-identical to the first.

``--train-stage pretrain`` (or ``finetune``) runs that stage for one step instead, on the tiny selector (or the
tiny Llama target), with ``--select-max-length`` tokens a row and, for stage 1, ``--subset-ratio`` of the
rows: what it measures is the stage's read, the phase "reading, checking and tokenising rows" (the text
read and tokenised once since f34d3bd; twice before it, so ``--baseline f34d3bd^`` is the figure before).

The corpus: rows of --data-dir cycled with fresh ids, one row in every --duplicate-every repeating the row
1,000 rows earlier (a ``duplicate_id`` reject) and every --bad-every-th line broken JSON (``bad_json``).
The 16-file layout holds the same lines in the same order, split evenly. No tokenizer (the data plane
alone) unless --tokenizer is given.

Per run: rows/s end to end (wall time of the command, Ray start-up included), the CPU seconds of the
command's process tree (sampled every 0.5 s) over wall x cores, the driver's peak RSS from the OS
(``wait4`` rusage of the driver process alone, not its Ray workers), the driver's peak private memory
(``RssAnon``, sampled every 0.5 s: the RSS counts the object-store pages the driver maps when it reads
an object, which are the store's memory, not the driver's) and the manifest's counts; for ``select``
also each phase's time from its console and when the first score file appeared (scores reach the disk
while the scoring runs, so that a crash keeps them).
``--baseline REF [REF ...]`` runs the same command from a git worktree of each REF (``PYTHONPATH``) for
"today's" figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from common import TRAIN_DIR, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
READ_PHASES = {  # --train-stage: the stage's read, as its console names the phase
    "pretrain": "reading, checking and tokenising rows",
    "finetune": "reading and tokenising rows",
}


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkouts = {"now": REPO}
    for ref in args.baseline:
        checkouts[f"baseline {ref}"] = worktree(ref, work / f"baseline_{ref}")
    codes = {  # label -> (checkout, scoring.num_actors; 0 = the product's own choice)
        name if actors == 0 else f"{name} ({actors} actors)": (root, actors)
        for name, root in checkouts.items()
        for actors in args.num_actors
    }
    selector = (
        tiny_selector(work / f"selector_{args.selector_layers}_layers", args.selector_layers)
        if args.select or args.train_stage == "pretrain"
        else None
    )
    target = tiny_target(work / "target") if args.train_stage == "finetune" else None
    runs = []
    for n in args.rows:
        folder = work / f"corpus_{n}_{args.files}_{args.duplicate_every}_{args.bad_every}"
        layouts = write_corpus(n, args.files, Path(args.data_dir), folder, args)
        if args.one_file_only:
            layouts = {"one file": layouts["one file"]}
        for (code, (root, actors)), (layout, path) in itertools.product(codes.items(), layouts.items()):
            measured = (
                [
                    (select_label(run, code), result)
                    for run, result in select_twice(root, path, work, selector, actors, args)
                ]
                if args.select
                else [(code, train_once(root, path, work / "out", selector or target, args))]
                if args.train_stage
                else [(code, validate(root, path, work / "out", args))]
            )
            for label, run in measured:
                run.update(rows=n, layout=layout, code=label)
                runs.append(run)
                print(
                    f"{n:>9,} rows  {layout:<9} {run['code']:<20} {run['rows_per_s']:>9,.0f} rows/s  "
                    f"cpu {run['cpu_use']:.0%}  driver peak {run['driver_peak_rss_gib']:.2f} GiB "
                    f"(private {run['driver_peak_private_gib']:.2f})",
                    flush=True,
                )
    if args.select:
        select_runs = SELECT_RUNS[:1] if args.fresh_only else SELECT_RUNS
        labels = [select_label(run, code) for code in codes for run in select_runs]
        compared = [
            (select_label(run, list(codes)[0]), select_label(run, code))
            for code in list(codes)[1:]
            for run in select_runs
        ]
    else:
        labels, compared = list(codes), [(list(codes)[0], code) for code in list(codes)[1:]]
    ratios = summarise(runs, args.rows, labels, compared)
    print_table(
        f"{'select' if args.select else args.train_stage or 'validate-data'} end to end",
        ["rows", "layout", "code", "wall s", "rows/s", "cpu use", "driver peak GiB", "private GiB", "read"]
        + ["rejected"]
        + (["scored", "selected", "same selection"] if args.select else [])
        + (["read phase s"] if args.train_stage else []),
        [
            [r["rows"], r["layout"], r["code"], r["wall_s"], round(r["rows_per_s"]), f"{r['cpu_use']:.0%}"]
            + [r["driver_peak_rss_gib"], r["driver_peak_private_gib"]]
            + [r["counts"]["rows_read"], r["counts"]["rows_rejected"]]
            + (
                [r["counts"]["rows_scored"], r["counts"]["rows_selected"], r.get("same_selection", "-")]
                if args.select
                else []
            )
            + ([r["phases_s"].get(READ_PHASES[args.train_stage])] if args.train_stage else [])
            for r in runs
        ],
    )
    for line in ratios["lines"]:
        print(line)
    write_json(args.json, {"args": vars(args), "cores": os.cpu_count(), "runs": runs, "ratios": ratios})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--files", type=int, default=16, help="files of the many-file layout")
    parser.add_argument("--data-dir", default=str(TRAIN_DIR))
    parser.add_argument("--duplicate-every", type=int, default=100_000)
    parser.add_argument("--bad-every", type=int, default=50_000)
    parser.add_argument("--split-bytes", type=int, default=None, help="data.split_bytes (default: the key's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer_name: also tokenise every row")
    parser.add_argument(
        "--baseline",
        nargs="*",
        default=[],
        help="git refs to measure beside today's code, each in its own worktree",
    )
    parser.add_argument("--sort-window", type=int, default=None, help="select's scoring.sort_window")
    parser.add_argument("--one-file-only", action="store_true", help="skip the many-file layout")
    parser.add_argument("--select", action="store_true", help="run select (tiny selector), fresh and resumed")
    parser.add_argument("--fresh-only", action="store_true", help="with --select: skip the resumed run")
    parser.add_argument(
        "--select-max-length", type=int, default=128, help="select's dataset.max_sequence_length"
    )
    parser.add_argument(
        "--num-actors", type=int, nargs="+", default=[0], help="with --select: scoring.num_actors, each a run"
    )
    parser.add_argument(
        "--train-stage",
        choices=list(READ_PHASES),
        default=None,
        help="run this training stage for one step (its read is what is measured) instead of validate-data",
    )
    parser.add_argument("--subset-ratio", type=float, default=0.05, help="with --train-stage pretrain")
    parser.add_argument("--selector-layers", type=int, default=2, help="decoder layers of the tiny selector")
    parser.add_argument("--work-dir", default="/tmp/selectmoe_data_plane")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.fresh_only and not args.select:
        parser.error("--fresh-only is a --select option")
    if args.num_actors != [0] and not args.select:
        parser.error("--num-actors is a --select option")
    if args.train_stage and args.select:
        parser.error("--train-stage and --select are different runs: give one")
    return args


def worktree(ref: str, path: Path) -> Path:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=REPO, check=True)
    return path


def write_corpus(n: int, files: int, data_dir: Path, folder: Path, args) -> dict[str, Path]:
    """The same n lines as one file and as ``files`` files; reused when already written."""
    one, many = folder / "one" / "corpus.jsonl", folder / "many"
    if (folder / "done").exists():
        return {"one file": one, f"{files} files": many}
    shutil.rmtree(folder, ignore_errors=True)
    one.parent.mkdir(parents=True)
    many.mkdir()
    sources = [json.loads(line) for path in sorted(data_dir.glob("*.jsonl")) for line in path.open()]
    per_file = -(-n // files)
    outs = [(many / f"part_{i:02d}.jsonl").open("w") for i in range(files)]
    with one.open("w") as whole:
        for i in range(n):
            if i % args.bad_every == args.bad_every - 1:
                line = '{"id": "broken", "messages": [\n'
            else:
                duplicate = i % args.duplicate_every == args.duplicate_every // 2 and i >= 1000
                index = i - 1000 if duplicate else i  # a duplicate: the line 1,000 rows earlier again
                row = sources[index % len(sources)]
                line = json.dumps({**row, "id": f"{row['id']}#{index}"}, ensure_ascii=False) + "\n"
            whole.write(line)
            outs[i // per_file].write(line)
    for out in outs:
        out.close()
    (folder / "done").touch()
    return {"one file": one, f"{files} files": many}


SELECT_RUNS = ("fresh", "resumed")


def tiny_selector(folder: Path, layers: int) -> Path:
    from selectmoe.demo.tiny import build_tiny_olmoe

    if not (folder / "config.json").exists():
        build_tiny_olmoe(folder, num_hidden_layers=layers)
    return folder


def tiny_target(folder: Path) -> Path:
    from selectmoe.demo.tiny import build_tiny_llama

    if not (folder / "config.json").exists():
        build_tiny_llama(folder)
    return folder


def train_once(code: Path, data: Path, out: Path, model: Path, args) -> dict:
    """``selectmoe pretrain`` or ``finetune`` (``args.train_stage``, the ``code`` checkout's) for one step."""
    shutil.rmtree(out, ignore_errors=True)
    stage = args.train_stage
    command = [sys.executable, "-m", "selectmoe.cli", stage, f"dataset.data_path={data}", f"output_dir={out}"]
    command += [f"dataset.max_sequence_length={args.select_max_length}", "training.max_steps=1"]
    if stage == "pretrain":
        command += [f"selector_model.path={model}", f"dataset.subset_ratio={args.subset_ratio}"]
    else:
        command += [f"model.name={model}", "training.batch_size=4"]
    if args.split_bytes is not None:
        command.append(f"data.split_bytes={args.split_bytes}")
    return measure(command, code, out, stage)


def select_label(run: str, code: str) -> str:
    """A select run's name in the table: "fresh" / "resumed", with the baseline's name for a baseline."""
    return run if code == "now" else f"{run}, {code}"


def select_twice(
    code: Path, data: Path, work: Path, selector: Path, actors: int, args
) -> list[tuple[str, dict]]:
    """``select`` (the ``code`` checkout's) from scratch, then resumed with every other score file deleted."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "selectmoe.cli", "select", f"selector_model.path={selector}"]
    command += [f"dataset.data_path={data}", f"output_dir={out}", "selection_percentage=0.05"]
    command += [f"dataset.max_sequence_length={args.select_max_length}", f"scoring.num_actors={actors}"]
    if args.sort_window is not None:
        command.append(f"scoring.sort_window={args.sort_window}")
    if args.split_bytes is not None:
        command.append(f"data.split_bytes={args.split_bytes}")
    fresh = measure(command, code, out, "select")
    if args.fresh_only:
        return [(SELECT_RUNS[0], fresh)]
    first = (out / "selected.jsonl").read_bytes()
    deleted = sorted((out / "scores").glob("*.parquet"))[::2]
    rescored = sum(pq.read_metadata(path).num_rows for path in deleted)
    for path in deleted:
        path.unlink()
    resumed = measure(command, code, out, "select")
    del resumed["first_score_file_s"]  # the files kept from the first run are there from the start
    resumed.update(rows_rescored=rescored, score_files_deleted=len(deleted))
    for run in (fresh, resumed):
        run["same_selection"] = (out / "selected.jsonl").read_bytes() == first
    return list(zip(SELECT_RUNS, (fresh, resumed), strict=True))


def validate(code: Path, data: Path, out: Path, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "selectmoe.cli", "validate-data", f"dataset.data_path={data}"]
    command += [f"output_dir={out}", "dataset.max_sequence_length=2048"]
    if args.split_bytes is not None and code == REPO:  # an older commit may not have the key
        command.append(f"data.split_bytes={args.split_bytes}")
    if args.tokenizer:
        command.append(f"tokenizer_name={args.tokenizer}")
    return measure(command, code, out, "validate-data")


def measure(command: list[str], code: Path, out: Path, name: str) -> dict:
    """Run ``command`` with ``code`` on the path: wall time, CPU use of its process tree, the driver's
    peak RSS and private memory, the manifest's counts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(code)
    started = time.time()
    log = out.parent / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(command, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT)
    cpu: dict[int, float] = {}
    private = 0  # the driver's own memory (RssAnon), sampled
    first_score_file = None
    root = psutil.Process(proc.pid)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if first_score_file is None and any((out / "scores").glob("*.parquet")):
            first_score_file = time.time() - started
        try:
            private = max(private, rss_anon(proc.pid))
            for p in [root, *root.children(recursive=True)]:
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.5)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{log.read_text()[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = ("rows_read", "rows_accepted", "rows_rejected", "rows_scored", "rows_selected")
    counts = {k: manifest["counts"][k] for k in kept if k in manifest["counts"]}
    counts["rejected_by_reason"] = manifest["counts"]["rejected_by_reason"]
    cpu_s = sum(cpu.values())
    phases = {
        m[1]: int(m[2]) for m in re.finditer(r"^stage \d \w+: (.+): done in (\d+) s$", log.read_text(), re.M)
    }
    return {
        "wall_s": round(wall, 1),
        "rows_per_s": counts["rows_read"] / wall,
        "cpu_s": round(cpu_s, 1),
        "cpu_use": cpu_s / (wall * os.cpu_count()),
        "driver_peak_rss_gib": round(usage.ru_maxrss * 1024 / 1024**3, 3),  # ru_maxrss is in KiB on Linux
        "driver_peak_private_gib": round(private / 1024**3, 3),
        "counts": counts,
        "phases_s": phases,
        **(
            {"first_score_file_s": first_score_file and round(first_score_file, 1)}
            if name == "select"
            else {}
        ),
    }


def rss_anon(pid: int) -> int:
    """Bytes of the process's private resident memory (``RssAnon``): its RSS without the shared pages
    it maps, such as Ray's object store (reading a reject record from it maps its pages into the
    driver, and the OS counts them in the driver's RSS); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def summarise(runs: list[dict], sizes: list[int], codes: list[str], compared: list[tuple[str, str]]) -> dict:
    """Ratios: one file / many files and (with several sizes) driver memory large / small, per code;
    rows/s of each ``compared`` pair (now, before)."""

    def find(n, layout_one, code):
        return next(
            (
                r
                for r in runs
                if r["rows"] == n and (r["layout"] == "one file") == layout_one and r["code"] == code
            ),
            None,
        )

    ratios = {}
    for code in codes:
        for n in sizes:
            one, many = find(n, True, code), find(n, False, code)
            if many is not None:
                ratios[f"{code}, {n} rows: rows/s one file / many files"] = (
                    one["rows_per_s"] / many["rows_per_s"]
                )
        if len(sizes) > 1:
            small, large = find(sizes[0], True, code), find(sizes[-1], True, code)
            ratios[f"{code}: driver peak RSS {sizes[-1]} / {sizes[0]} rows (one file)"] = (
                large["driver_peak_rss_gib"] / small["driver_peak_rss_gib"]
            )
            ratios[f"{code}: driver peak private memory {sizes[-1]} / {sizes[0]} rows (one file)"] = (
                large["driver_peak_private_gib"] / small["driver_peak_private_gib"]
            )
    for (now_code, before_code), n, layout_one in itertools.product(compared, sizes, (True, False)):
        now, before = find(n, layout_one, now_code), find(n, layout_one, before_code)
        if now is not None and before is not None:
            layout = "one file" if layout_one else "many files"
            ratios[f"{n} rows, {layout}: rows/s {now_code} / {before_code}"] = (
                now["rows_per_s"] / before["rows_per_s"]
            )
    lines = [f"ratio {name}: {value:.2f}" for name, value in ratios.items()]
    return {"values": ratios, "lines": lines}


if __name__ == "__main__":
    main()
