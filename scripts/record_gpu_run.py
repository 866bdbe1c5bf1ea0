"""Turn the output folder of ``scripts/gpu_check.sh`` into the project's records.

Usage: python scripts/record_gpu_run.py OUTDIR DEVICE_NAME [--commit SHA]

Writes ``benchmarks/results/gpu-check-<device>-<yyyymmdd>.json`` (step exit codes, test counts from the
JUnit XML, the CUDA and portable bench records verbatim) and prints a draft entry for ``docs/gpu-log.md`` with the
figures filled in, for a person to check and paste. Nothing here edits benchmark numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def junit_counts(path: Path) -> dict[str, object]:
    """Totals and the names of failed tests from a JUnit XML file (empty when it is missing)."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**totals, "failed": failed}


def tail_counts(log: Path) -> str:
    """The last pytest summary line of a log ("12 passed, 1 failed in 30s"), if any."""
    if not log.exists():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if " passed" in line or " failed" in line]
    return lines[-1].strip("= ") if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("device", help="e.g. 'NVIDIA H100 80GB HBM3'")
    parser.add_argument("--commit", default="")
    args = parser.parse_args(argv)
    out = args.outdir
    commit = args.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    bench = json.loads((out / "bench_cuda.json").read_text()) if (out / "bench_cuda.json").exists() else {}
    portable = json.loads((out / "bench_portable.json").read_text()) if (out / "bench_portable.json").exists() else {}
    cpu4 = json.loads((out / "bench_portable_cpu4.json").read_text()) if (out / "bench_portable_cpu4.json").exists() else {}
    today = datetime.date.today()
    record = {
        "device": args.device,
        "commit": commit,
        "date": today.isoformat(),
        "steps_rc": summary.get("steps_rc", {}),
        "total_s": summary.get("total_s"),
        "tests_kernels": junit_counts(out / "junit.xml"),
        "tests_log_summary": tail_counts(out / "tests.log"),
        "bench": bench,
        "bench_portable": portable,
        "bench_portable_cpu4": cpu4,
    }
    slug = "".join(c if c.isalnum() else "-" for c in args.device.lower()).strip("-")
    dest = ROOT / "benchmarks" / "results" / f"gpu-check-{slug}-{today:%Y%m%d}.json"
    dest.write_text(json.dumps(record, indent=2))
    print(f"wrote {dest.relative_to(ROOT)}")
    lines = [f"## {today.isoformat()}: {args.device}, commit {commit}", ""]
    rc = record["steps_rc"]
    lines.append("Steps: " + ", ".join(f"{k} {'ok' if v == 0 else f'rc={v}'}" for k, v in sorted(rc.items())) + ".")
    if record["tests_log_summary"]:
        lines.append(f"Tests: {record['tests_log_summary']}.")
    for r in bench.get("results", []):
        if r.get("op") in ("dispatch", "combine") or str(r.get("op", "")).startswith("overlap"):
            frac = r.get("fraction_of_copy", r.get("kept_fraction"))
            lines.append(f"- {r['op']} ({r.get('num_sms')} SMs): {r['time_s_median'] * 1e3:.3f} ms, "
                         f"{'' if frac is None else f'{frac:.3f} '}({r.get('target')}: {'met' if r.get('target_met') else 'missed'})")
    for r in portable.get("results", []) + cpu4.get("results", []):
        met = f" ({r['target']}: {'met' if r.get('target_met') else 'missed'})" if r.get("target") else ""
        lines.append(f"- portable {r['op']} ({r.get('transport')}, {r.get('world_size')} ranks on the host, hidden "
                     f"{r.get('hidden')}): {r['time_s_median'] * 1e3:.1f} ms, {r['ratio_to_baseline']:.2f} x its raw all-to-all{met}")
    lines.append(f"Records: `{dest.relative_to(ROOT)}`.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
