"""``flowtruth demo [--out DIR]``: the whole collection path in the virtual lab, scored.

Brings the virtual lab up (two phones, a Samsung SM-S936B and a Xiaomi 24069PC21I, with
their own clock offsets), pairs them (phone1 calls and starts the chats, phone2 answers
and replies; each has the other's owner as a contact), runs the same session engine used
with real phones — device scripts pushed over adb, strace attached, netstat polling, AP
capture — for Signal, Telegram and WhatsApp (a chat both ways and an audio call the other
phone answers, both phones' sessions in lockstep), labels every flow, exports MIRAGE
JSON, scores the labels against the simulated apps' own socket truth, prints the summary
with every session's verification (role and peer) and tears the lab down. DIR keeps the
run directories, ``truth.csv`` and ``score.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

APPS = ("signal", "telegram", "whatsapp")
ACTIVITIES = ("chat", "audio_call")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_pairs(names: list[str]) -> list[list[str]]:
    """The demo's pairs: consecutive phones (phone1 with phone2, phone3 with phone4, ...);
    an odd last phone runs alone."""
    return [names[i:i + 2] for i in range(0, len(names) - 1, 2)]


def verification(runs: list[Any]) -> list[dict[str, Any]]:
    """Each session's ``scenario`` verdict from its manifest: verified, role, peer."""
    out = []
    for r in runs:
        m = r.manifest
        if not m:
            try:
                m = json.loads((Path(r.run_dir) / "manifest.json").read_text())
            except (OSError, ValueError):
                m = {}
        sc = m.get("scenario") or {}
        out.append({"session": r.session_id, "outcome": r.outcome,
                    "verified": sc.get("verified"), "role": sc.get("role"),
                    "peer": sc.get("peer"), "reason": sc.get("reason") or r.error})
    return out


def score_runs(runs: list[Any], lab: Any, truth: list[Any]) -> dict[str, Any]:
    """Precision and recall of each completed run's labels against the lab's truth.

    A run is scored on its own phone's truth sockets of its target app that were open
    while the run's flows were captured (DNS excluded: on Android netd, not the app,
    sends it).
    """
    from controller.lab.truth import read_labels_csv, score

    per_app: dict[str, dict[str, int]] = {}
    sessions = []
    for r in runs:
        labels = next(iter(Path(r.run_dir).rglob("labels.csv")), None)
        if r.outcome != "completed" or labels is None:
            continue
        manifest = r.manifest or json.loads((Path(r.run_dir) / "manifest.json").read_text())
        app = manifest["apps"][0]["package"]
        addresses = set(manifest["device"].get("addresses") or [manifest["device"]["ip"]])
        flows = read_labels_csv(labels)  # the run's capture is already this phone's split
        if not flows:
            continue
        window = (min(f.start for f in flows), max(f.end for f in flows))
        mine = [t for t in truth if t.local_ip in addresses]
        # On Android netd, not the app, sends DNS (the labeller gives unexplained port-53
        # flows to the resolver); the lab's apps query for themselves, so their DNS
        # counts for precision but not for recall.
        sc = score(flows, mine, apps=[app], window=window)[app]
        rec = score(flows, [t for t in mine if t.remote_port != 53], apps=[app],
                    window=window)[app]
        sc.truth, sc.recalled = rec.truth, rec.recalled
        sessions.append({"session": r.session_id, **sc.to_dict()})
        acc = per_app.setdefault(app, {"labelled": 0, "correct": 0, "truth": 0,
                                       "recalled": 0})
        for k in acc:
            acc[k] += int(getattr(sc, k))
    total = {k: sum(a[k] for a in per_app.values())
             for k in ("labelled", "correct", "truth", "recalled")}

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "sessions": sessions,
        "apps": {app: {**a, "precision": ratio(a["correct"], a["labelled"]),
                       "recall": ratio(a["recalled"], a["truth"])}
                 for app, a in per_app.items()},
        "total": {**total, "precision": ratio(total["correct"], total["labelled"]),
                  "recall": ratio(total["recalled"], total["truth"])},
    }


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option("--out", "-o", help="directory for the runs, truth.csv and score.json")] = Path("demo-out"),
        phones: Annotated[int, typer.Option(help="virtual phones")] = 2,
        wait_scale: Annotated[float, typer.Option(help="scale of the scenarios' waits (1 = as written)")] = 0.5,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no live display")] = False,
        locale: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
            "--locale", help="the phones' language: LOCALE (every phone) or phoneN=LOCALE, "
            "e.g. phone2=de-DE (repeatable)")] = None,
        interruptions: Annotated[Optional[float], typer.Option(  # noqa: UP045
            "--interruptions", min=0.0, max=1.0,
            help="chance per action of a permission prompt or rating dialog (default 0.03)")] = None,
    ) -> None:
        """Run the virtual-lab demo: 2 phones × Signal/Telegram/WhatsApp, labelled and scored."""
        from rich.console import Console
        from rich.table import Table

        from controller.commands.lab import phone_options
        from controller.commands.run import RichSink, drive
        from controller.errors import LabError
        from controller.lab.topology import Lab, skip_reason
        from controller.lab.truth import read_truth, write_truth_csv
        from controller.plan import Plan, run_plan
        from controller.session import Environment

        reason = skip_reason()
        if reason:
            raise LabError(f"the demo needs the virtual lab: {reason}",
                           hint="run it as root on Linux (sudo .venv/bin/flowtruth demo)")
        # FLOWTRUTH_LAB_STATE_DIR: a demo lab with its own state directory (tests)
        state_dir = os.environ.get("FLOWTRUTH_LAB_STATE_DIR") or None
        if Lab.load(state_dir) is not None:
            raise LabError("a virtual lab is already running",
                           hint="take it down first: flowtruth lab down")
        from controller.safety import markup, plain

        console = Console()
        out = out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        adb_env = dict(os.environ)

        def adb(*args: str) -> None:
            subprocess.run(["adb", "-P", str(port), *args], env=adb_env, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=30)

        import contextlib

        from controller.commands.run import interrupted_error
        from controller.interrupt import Cancel, interrupts

        t0 = time.monotonic()
        cancel = Cancel()
        # Ctrl-C/SIGTERM from here on stop the demo cleanly (never half a lab left up)
        guard = contextlib.ExitStack()
        guard.enter_context(interrupts(cancel))
        adb("start-server")
        lab = None
        try:
            console.print(f"[bold]bringing up the virtual lab[/] ({phones} phones, adb server "
                          f"on port {port})")
            lab = Lab.up(phones=phones, adb_port=port, workdir=out / "lab", state_dir=state_dir,
                         phone_options=phone_options(phones, locale or [], interruptions))
            for p in lab.phones:
                console.print(plain(f"  {p.name}: {p.config.manufacturer} {p.config.model} "
                                    f"(adb {p.serial}, {p.ip}, clock "
                                    f"{p.config.clock_offset_s:+.3f} s)"), markup=False)
            names = [p.name for p in lab.phones]
            plan = Plan(name="demo", devices=[f"lab:{n}" for n in names],
                        pairs=demo_pairs(names), apps=list(APPS), activities=list(ACTIVITIES),
                        wait_scale=wait_scale, output=str(out / "runs"))
            for a, b in plan.pairs:
                console.print(f"  pair: {a} calls and starts the chats, {b} answers and "
                              "replies")
            env = Environment.for_lab(lab, runs_root=out / "runs")
            sink = RichSink(console)
            if cancel.reason:  # while the lab came up: run nothing
                from controller.plan import PlanResult

                raise interrupted_error(cancel, PlanResult(cancelled=True))
            res = drive(lambda cancel: run_plan(plan, env, sink, cancel), sink, console, quiet,
                        cancel)
            if cancel.reason:
                raise interrupted_error(cancel, res)
            truth = read_truth(lab.truth_path)
            write_truth_csv(truth, out / "truth.csv")
            result = score_runs(res.results, lab, truth)
            result["elapsed_s"] = round(time.monotonic() - t0, 1)
            result["failed_sessions"] = [r.session_id for r in res.failed]
            checks = verification(res.results)
            result["verification"] = checks
            unverified = [c["session"] for c in checks if c["verified"] is not True]
            result["unverified_sessions"] = unverified
            (out / "score.json").write_text(json.dumps(result, indent=2))
            table = Table(title="labels scored against the simulated apps' own socket truth")
            for c in ("app", "flows labelled", "correct", "precision", "truth sockets",
                      "recall"):
                table.add_column(c, justify="right" if c != "app" else "left")

            def pct(x: float | None) -> str:
                return "-" if x is None else f"{100 * x:.1f} %"

            for name, a in sorted(result["apps"].items()):
                table.add_row(markup(name), str(a["labelled"]), str(a["correct"]), pct(a["precision"]),
                              str(a["truth"]), pct(a["recall"]))
            tot = result["total"]
            table.add_row("[bold]all", str(tot["labelled"]), str(tot["correct"]),
                          pct(tot["precision"]), str(tot["truth"]), pct(tot["recall"]))
            console.print(table)
            vt = Table(title="scenario verification (manifest scenario.verified)")
            for c in ("session", "role", "peer", "verified"):
                vt.add_column(c)
            for chk in checks:
                ok = chk["verified"] is True
                vt.add_row(chk["session"], chk["role"] or "-", chk["peer"] or "-",
                           "[green]yes[/]" if ok else f"[red]no[/] {chk['reason'] or ''}")
            console.print(vt)
            if unverified:
                console.print(f"[red]{len(unverified)} of {len(checks)} sessions not "
                              f"verified:[/] {', '.join(unverified)}")
            else:
                console.print(f"every session verified ({len(checks)}), each with its role "
                              "and peer")
            console.print(f"{len(res.results)} sessions, {len(res.failed)} failed; runs in "
                          f"{out / 'runs'}; truth in {out / 'truth.csv'}")
        finally:
            if lab is not None:
                console.print("[bold]taking the virtual lab down[/]")
                lab.down(keep_workdir=True)
            adb("kill-server")
            guard.close()
        console.print(f"demo finished in {time.monotonic() - t0:.0f} s")
        if res.failed or unverified:
            from controller.errors import ControllerError

            bad = [r.session_id for r in res.failed] + [u for u in unverified
                                                        if u not in {r.session_id for r in res.failed}]
            raise ControllerError(f"{len(bad)} of {len(res.results)} demo sessions failed or "
                                  f"were not verified: {', '.join(bad)}",
                                  hint=f"their run directories under {out / 'runs'} say why")
