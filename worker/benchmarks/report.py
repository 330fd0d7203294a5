"""Markdown tables from worker/benchmarks/results/*.json (the README's figures).

    python worker/benchmarks/report.py
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def hist(h: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in h.items())


def modes_table(doc: dict, where: str = "one process") -> list[str]:
    c = doc["config"]
    out = [f"K={c['explorers']}, W={c['width']}, {c['prompts']} held-out prompts, {c['max_new_tokens']} new tokens, "
           f"{c['threads'] or 1} thread, {where}", "",
           "| mode | RPT | tokens/s | fallback rate | wasted node-segments | mean occupancy | identical to ar | "
           "acceptance by boundary |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in doc["modes"].items():
        if mode == "dex-profile":
            continue
        out.append(f"| {mode} | {r.get('rpt', '')} | {r.get('tokens_per_s') or ''} | {r.get('fallback_rate', '')} | "
                   f"{r.get('wasted_node_segments', '')} | {r.get('mean_occupancy', '')} | {r.get('identical_to_ar')} | "
                   f"{hist(r['accept_hist']) if 'accept_hist' in r else ''} |")
    return out


def script_section(result: str, script: str, heading: str, command: str) -> list[str]:
    """A heading, the command and the table the benchmark script itself renders from its result
    (nothing when the result file is missing)."""
    doc = load(result)
    if doc is None:
        return []
    sys.path.insert(0, str(Path(__file__).parent))
    return [heading, "", command, "", importlib.import_module(script).table(doc), ""]


def speedup_section(sp: dict, title: str, command: str) -> list[str]:
    """A speedup.py result: the runs, the summary and the projection."""
    lines: list[str] = []
    c = sp["config"]
    lines += [title, "", command, "",
              f"W={c['width']}, compile={c['compile']}; median of {c.get('repeats', 1)} passes per run, "
              "the runs taking turns", "",
              "| run | tokens/s (median) | passes | RPT | ms/round | identical to ar |", "|---|---|---|---|---|---|"]
    for name, r in sp["runs"].items():
        extra = f" (exit layer {r['exit_layer']})" if "exit_layer" in r else ""
        passes = " ".join(str(x) for x in r.get("tokens_per_s_repeats", []))
        lines.append(f"| {name}{extra} | {r['tokens_per_s']} | {passes} | {r.get('rpt', '')} | "
                     f"{r.get('ms_per_round', '')} | {r['identical_to_ar']} |")
    s = sp["summary"]
    lines += ["", f"DEX K=2 on 2 processes: {s['dex_vs_ar_1t']}x ar (1 thread), {s['dex_vs_best_other']}x the best "
                  f"of the others, {s.get('dex_vs_best_single_process', '')}x the best single-process "
                  f"configuration ({s.get('best_single_process', '')}).", ""]
    if "dex_vs_best_single_process_paired_repeats" in s:
        lines += ["Paired by pass (DEX against the best single-process run of the same pass; the runs of a pass "
                  f"are back to back): median **{s['dex_vs_best_single_process_paired_median']}x**; passes "
                  f"{', '.join(f'{r}x' for r in s['dex_vs_best_single_process_paired_repeats'])}.", ""]
    if "bounds" in s:
        b, dex = s["bounds"], sp["runs"]["dex-K2-2proc-1t"]
        lines += [f"The bound from DEX's own measured parts: prefill {dex['prefill_ms_per_token']} ms per token plus "
                  f"RPT × the coordinator's explorer step ({dex['coordinator_step_ms']} ms, timed while the other "
                  "explorer runs), with no coordination at all: "
                  f"{b['no_coordination_measured_rpt_tokens_per_s']} tokens/s at the measured RPT "
                  f"(**{b['no_coordination_measured_rpt_vs_best_single_process']}x** the best single-process "
                  f"configuration), {b['no_coordination_rpt_1_tokens_per_s']} tokens/s at RPT 1, every proposal "
                  f"right (**{b['no_coordination_rpt_1_vs_best_single_process']}x**).", ""]
    split = sp["runs"].get("dex-K2-2proc-1t", {}).get("round_split_ms")
    if split:
        lines += ["Where a DEX round goes, ms per round of the median pass, real steps (`round_split_ms`; the "
                  "null-step table below times the same phases with steps that cost nothing):", "",
                  "| " + " | ".join(k.replace("_", " ") for k in split) + " | all but the step |",
                  "|" + "---|" * (len(split) + 1),
                  "| " + " | ".join(str(v) for v in split.values())
                  + f" | {round(sum(split.values()) - split['step'], 4)} |", ""]
    if "two_cores" in s:
        t = s["two_cores"]
        lines += [f"What the second core is worth to each side: `ar` runs **{t['ar_thread_scaling']}x** faster with a "
                  "second thread (its compiled kernels split each projection over both cores); DEX at K=2 runs two "
                  f"half-stacks at once, at best 2 / RPT = {t['dex_ideal_vs_ar_1t']}x `ar` at 1 thread (measured: "
                  f"{t['dex_measured_vs_ar_1t']}x). So on two cores DEX at K=2 can gain at most "
                  f"**{t['dex_ceiling_vs_ar_2t']}x** over `ar` with 2 threads, with no coordination and no prefill "
                  "bubble at all.", ""]
    pj = sp["projection"]
    if "step_slowdown_when_concurrent" in pj:
        lines += [f"The coordinator's own explorer step takes {pj['step_slowdown_when_concurrent']}x as long while "
                  "the other explorer runs as it does alone (above 1: the two cores share caches and memory bandwidth; "
                  "the two timings are minutes apart, and this VM's core speed drifts).", ""]
    lines += ["Projection, one device per explorer (measured step times, measured RPT, measured per-round "
              f"overhead {pj['overhead_ms_per_round']} ms;",
              "explorer steps timed alone, as on devices that share no memory; W = 2^(K−1)):", "",
              "| K | RPT | slowest explorer step ms | round ms | projected tokens/s | vs ar | ideal K/RPT |",
              "|---|---|---|---|---|---|---|"]
    for k, v in pj.items():
        if k.startswith("K") and "round_ms" in v:
            lines.append(f"| {k[1:]} | {v['rpt']} | {max(v['step_ms'])} | {v['round_ms']} | "
                         f"{v['projected_tokens_per_s']} | {v['projected_speedup_vs_ar_1t']}x | "
                         f"{v['ideal_speedup_K_over_rpt']}x |")
    lines.append("")
    return lines


def main() -> None:
    lines: list[str] = []
    for K in (4, 2, 8):
        doc = load(f"bench-k{K}.json")
        if doc:
            lines += [f"#### K = {K}", "",
                      f"`dex bench --explorers {K} --width 8 --limit 50 --max-new-tokens 64 --threads 1 --no-compile --profile`", ""]
            lines += modes_table(doc) + [""]
            modes = doc["modes"]
            selects = [v["rpt"] for k, v in modes.items() if k.startswith("select:")]
            if selects and modes.get("dex"):
                lines.append(f"dex RPT / best select:J RPT = {modes['dex']['rpt'] / min(selects):.3f}; "
                             f"dex RPT / EAD oracle RPT = {modes['dex']['rpt'] / modes['ead-oracle']['rpt']:.3f}")
                lines.append("")
            prof = modes.get("dex-profile")
            if prof and K == 4:
                lines += ["Where a K=4 dex round's time goes (ms per round, own time, top entries):", "",
                          "| function | ms/round |", "|---|---|"]
                lines += [f"| `{name}` | {ms} |" for name, ms in prof.items()]
                lines += ["", f"executor {modes['dex']['executor_ms_per_round']} ms/round, lattice state machine "
                          f"{modes['dex']['lattice_ms_per_round']} ms/round, whole round {modes['dex']['ms_per_round']} ms", ""]
    doc = load("rpt-vs-width.json")
    if doc:
        sys.path.insert(0, str(Path(__file__).parent))
        from rpt_vs_width import format_table

        lines += ["### Rounds per token against the width W", "",
                  f"`{doc['config'].get('command', 'worker/benchmarks/rpt_vs_width.py')}`", "",
                  format_table(doc), ""]
    rows = []
    for th in (1, 2):
        doc = load(f"ar-vs-hf-{th}t.json")
        if doc:
            ar, hf = doc["modes"]["ar"], doc["modes"]["hf-generate"]
            floor = doc["modes"].get("matmul-floor", {})
            rows.append(f"| {th} | {ar['tokens_per_s']} | {hf['tokens_per_s']} | "
                        f"{ar['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {hf['identical_to_ar']} | "
                        f"{floor.get('blas_tokens_per_s', '')} | {floor.get('row_dots_tokens_per_s', '')} | "
                        f"{floor.get('max_speedup_vs_hf', '')}x |")
    if rows:
        lines += ["### The engine against Hugging Face generate (ar, K=1)", "",
                  "`dex bench --explorers 1 --modes ar --hf --limit 50 --max-new-tokens 64 "
                  "--threads T` (T = 1, 2; default flags: the compiled step, one row per request); the last three "
                  "columns time the model's weight matmuls alone (one row through every projection and the LM head, "
                  "nothing else) through BLAS (`F.linear`, what Hugging Face runs) and as the engine's compiled "
                  "decode step computes them (`row_dots`), and the faster one's ratio to Hugging Face: the ceiling "
                  "for any engine that reads these fp32 weights per token", "",
                  "| threads | dexserve ar tokens/s | HF generate tokens/s | ratio | identical | weight matmuls "
                  "alone (BLAS), tokens/s | (row dots), tokens/s | ceiling vs HF |", "|---|---|---|---|---|---|---|---|"]
        lines += rows + [""]
    sp = load("speedup.json")
    if sp:
        lines += speedup_section(sp, "### Explorers on separate devices (2 cores here)",
                                 "`python worker/benchmarks/speedup.py --repeats 5 --limit 50 --max-new-tokens 64`")
    ss = load("speedup-standard.json")
    if ss:
        lines += speedup_section(ss, "### The same on another checkpoint: a standard one with adapters",
                                 "`python worker/benchmarks/speedup.py --model runs/dexcode-6m-standard --repeats 3 "
                                 "--limit 50 --max-new-tokens 64 --out worker/benchmarks/results/speedup-standard.json`")
    lines += script_section("prefill-pipeline.json", "prefill_pipeline",
                            "### Prompt prefill: one process against pipelined explorer processes",
                            "`python worker/benchmarks/prefill_pipeline.py --out "
                            "worker/benchmarks/results/prefill-pipeline.json`")
    lines += script_section("prefill-itl.json", "prefill_itl",
                            "### Running streams while a long prompt arrives (chunked prefill)",
                            "`python worker/benchmarks/prefill_itl.py --explorers 4 --out "
                            "worker/benchmarks/results/prefill-itl.json`")
    lines += script_section("prefill-itl-default.json", "prefill_itl",
                            "#### The same with the default layout (K=2, one process per explorer)",
                            "`python worker/benchmarks/prefill_itl.py --out "
                            "worker/benchmarks/results/prefill-itl-default.json`")
    dd = load("bench-default.json")
    if dd:
        lines += ["### `dex bench` with default flags", "",
                  "`dex bench --limit 50 --max-new-tokens 64 --out worker/benchmarks/results/bench-default.json` "
                  "(the auto layout: K=2, one process per explorer over shared memory, 1 thread each, compiled "
                  "steps, W=8; `ar-1proc`: plain decoding in one process with every core's threads)", ""]
        lines += modes_table(dd, "one process per explorer") + [""]
        single, dex = dd["modes"].get("ar-1proc"), dd["modes"].get("dex")
        if single and dex:
            lines += [f"dex: **{dex['tokens_per_s'] / single['tokens_per_s']:.3f}x** plain decoding in one process "
                      f"(ar-1proc), {dex['tokens_per_s'] / dd['modes']['ar']['tokens_per_s']:.3f}x `ar` on the same "
                      "explorer processes.", ""]
    lines += script_section("round-overhead.json", "round_overhead", "### Coordination per round (null step)",
                            "`python worker/benchmarks/round_overhead.py --rounds 2000 --repeats 3 --configs "
                            "2x1,4x8,8x16`: every explorer's step costs nothing (scripted readouts), the lattice, "
                            "packing and signalling run for real; µs per round, median of 3 runs of 2000 rounds, "
                            "1 thread per process")
    sc = load("step-scaling.json")
    if sc:
        lines += ["### Explorer steps against 1/K of the full step", "",
                  "`python worker/benchmarks/step_scaling.py --out worker/benchmarks/results/step-scaling.json`", "",
                  sc["markdown"], ""]
    lines += service_tables()
    print("\n".join(lines))


def service_tables() -> list[str]:
    """The gateway + queue (stand-in engine) and real-engine service runs, and the tracing cost."""
    out: list[str] = []
    runs = [d for d in (load("service-standin.json"), load("service-dex.json")) if d]
    if runs:
        out += ["### The service", "",
                "`python worker/benchmarks/service_bench.py --concurrency 1 10 100 --tokens 64` (a stand-in engine that commits "
                "instantly: what the gateway and the queue cost) and `python worker/benchmarks/service_bench.py --engine dex "
                "--explorers 4 --width 8 --concurrency 1 4 --tokens 64 --max-batch 4` (the real engine, one worker)", "",
                "| engine | streams | tokens/s (all streams) | commit→client p50 / p99 ms | TTFT p50 / p99 ms | "
                "tokens/s per stream (p50) |", "|---|---|---|---|---|---|"]
        for d in runs:
            for lv in d["levels"]:
                out.append(f"| {d['engine']} | {lv['streams']} | {lv['tokens_per_s']} | {lv['commit_to_client_ms_p50']} / "
                           f"{lv['commit_to_client_ms_p99']} | {lv['ttft_ms_p50']} / {lv['ttft_ms_p99']} | "
                           f"{lv['stream_tokens_per_s_p50']} |")
        out.append("")
    doors = load("service-doors.json")
    if doors:
        out += ["### The HTTP door against gRPC", "",
                "`python worker/benchmarks/service_bench.py --engine dex --explorers 4 --width 8 --door both "
                "--concurrency 1 4 16 --tokens 64 --max-batch 16`: the real engine, one worker; the same greedy "
                "requests through the gRPC door and through the OpenAI-compatible HTTP door (the official `openai` "
                "client, streaming), the doors taking turns at each level", "",
                "| door | streams | tokens/s (all streams) | TTFT p50 / p99 ms | tokens/s per stream (p50) |",
                "|---|---|---|---|---|"]
        for lv in doors["levels"]:
            out.append(f"| {lv['door']} | {lv['streams']} | {lv['tokens_per_s']} | {lv['ttft_ms_p50']} / "
                       f"{lv['ttft_ms_p99']} | {lv['stream_tokens_per_s_p50']} |")
        out.append("")
    tr = load("tracing-overhead.json")
    if tr:
        out += ["### Tracing cost", "",
                "`python worker/benchmarks/tracing_overhead.py --repeats 5 --max-new-tokens 64`: the real engine with the "
                "worker's observer, tracing off vs on (OTLP/gRPC export of a `decode` span with an event per commit and "
                "per collapse to a local receiver)", "",
                f"K={tr['explorers']}, W={tr['width']}, {tr['batch']} requests, {tr['repeats']} runs per arm, median: "
                f"tracing off {tr['off']['median_tokens_per_second']:.1f} tokens/s, on "
                f"{tr['on']['median_tokens_per_second']:.1f} tokens/s ({tr['overhead_pct']:+.2f}% wall time); the "
                f"observer hooks take {tr['hook_overhead_pct']:.2f}% of decode time more with tracing on; "
                f"{tr['exported']['spans']} spans and {tr['exported']['events']} events exported.", ""]
    return out


if __name__ == "__main__":
    sys.exit(main())
