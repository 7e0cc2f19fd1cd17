"""The short table ``bench/gpu_run.sh`` prints last: every step's exit status, the kernel checks
and the training-step ratios, read back from what the steps wrote into the output folder.

    python -m boft_triton.bench.gpu_summary OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _steps(out: Path) -> list[str]:
    path = out / "steps.tsv"  # "name<TAB>exit status<TAB>seconds", one line per step of gpu_run.sh
    if not path.is_file():
        return ["(no steps.tsv)"]
    lines = []
    for line in path.read_text().splitlines():
        name, rc, seconds = (line.split("\t") + ["", ""])[:3]
        verdict = {"0": "ok", "124": "TIMED OUT", "137": "KILLED"}.get(rc, f"FAILED (exit {rc})")
        lines.append(f"  {name:<22} {verdict:<18} {seconds:>5} s")
    return lines


def _kernel_rows(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("gpu-check-*.json")):
        data = json.loads(path.read_text())
        lines.append(f"  {data['card']}: copy {data['copy_bandwidth_gbs']:.0f} GB/s, torch {data['torch']}, "
                     f"triton {data['triton']}")
        for r in data["rows"]:
            worst = max(r["rel_err"].values())
            flag = "" if r["correct"] else "  WRONG"
            if r["op"] == "butterfly":
                lines.append(f"  butterfly b{r['b']:<3} N{r['N']} {r['impl']:<14} fwd {r['fwd_ms']:8.3f} ms "
                             f"({100 * r['fwd_bw_fraction']:3.0f}% BW)  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms  "
                             f"err {worst:.1e}{flag}")
            else:
                lines.append(f"  cayley {r['blocks']:>5} x {r['b']:<3}   {r['impl']:<18} fwd+bwd {r['fwd_bwd_ms']:8.3f} ms  "
                             f"err {worst:.1e}{flag}")
    return lines or ["  (no gpu-check results)"]


def _payloads(out: Path, kind: str):
    """The results files of one benchmark kind in the folder, parsed, in name order."""
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("kind") == kind:
            yield data


def _training_rows(out: Path) -> list[str]:
    lines = []
    for data in _payloads(out, "boft_triton.bench.training_step"):
        work = data["workload"]
        lines.append(f"  {work['name']}: batch {work['batch_size']} x {work['seq_len']}, {work['dtype']}, "
                     f"targets {','.join(work['targets'])}")
        for r in data["rows"]:
            if r["status"] != "ok":
                lines.append(f"    {r['method']:<28} {r['status']}: {(r.get('reason') or '')[:80]}")
                continue
            ratios = r.get("ratios") or {}
            floor = (ratios.get("floor") or {}).get("step_ms")
            lora = (ratios.get("peft-lora-r16") or {}).get("step_ms")
            mem = r.get("peak_mem_mib")
            lines.append(f"    {r['method']:<28} {r['step_ms']:9.1f} ms  x floor {floor or 0:5.2f}  "
                         f"x LoRA {lora or 0:5.2f}  peak {mem or 0:8.0f} MiB")
    return lines or ["  (no training-step results)"]


def _serving_rows(out: Path) -> list[str]:
    lines = []
    for data in _payloads(out, "boft_triton.bench.serving"):
        lines.append(f"  {data['settings']['workload']}: batch {data['settings']['batch']} x {data['settings']['seq_len']}")
        for r in data["rows"]:
            lines.append(f"    K={r['K']:<2} {r['method']:<12} forward {r['forward_ms']:8.2f} ms (x base {r['forward_x_base']:.2f})"
                         f"  generate {r['generate_ms']:8.1f} ms (x base {r['generate_x_base']:.2f})")
    return lines or ["  (no serving results)"]


def _engine_rows(out: Path) -> list[str]:
    lines = []
    for data in _payloads(out, "boft_triton.bench.engines"):
        for r in data["rows"]:
            mem = r.get("rss_peak_growth_mib")
            lines.append(f"  {r['engine']:<6} {r['method']:<20} rank {r['rank']}  {r['step_ms']:9.1f} ms  "
                         f"step peak {mem or 0:8.0f} MiB")
    return lines or ["  (no engine results)"]


def _tests(out: Path) -> list[str]:
    path = out / "gpu-tests.xml"
    if not path.is_file():
        return ["  (no gpu-tests.xml: the tests did not finish)"]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"  {count['tests']} tests: {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped"]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"    FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def summary(out: Path) -> str:
    parts = [("steps", _steps(out)), ("kernels (checked against fp64, then timed)", _kernel_rows(out)),
             ("kernel tests", _tests(out)), ("training step", _training_rows(out)), ("serving", _serving_rows(out)),
             ("engines", _engine_rows(out))]
    return "\n".join(f"== {title}\n" + "\n".join(lines) for title, lines in parts)


def all_good(out: Path) -> bool:
    """Every step exited 0 (gpu_check exits 1 on a wrong result, pytest on a failed test)."""
    path = out / "steps.tsv"
    return path.is_file() and all(line.split("\t")[1] == "0" for line in path.read_text().splitlines() if line)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "bench/results/gpu-run")
    print(summary(out))
    return 0 if all_good(out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
