"""The README's audit workflow, end to end, with the nodes' own exports.

A demo run (3 real nodes on the memory bus, 3 rounds); each hospital exports its witness file
with ``fedsm node witness export``; the auditor verifies the researcher's log against all of
them. Then the researcher cheats: the last round cut off, or an early record rewritten and
everything after it re-chained (both still pass ``--verify`` alone). With the witnesses the
audit fails, naming the node, the seq and both hashes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_witness_audit import _rechain

from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.log.read import scan


def _fedsm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    run = tmp_path_factory.mktemp("witnessed")
    result = run_demo(run, DemoConfig(nodes=3, rounds=3, seed=0), say=lambda line: None)
    log = Path(result.log)
    job_id = scan(log).records[0].event.job_id
    files, keys = [], []
    for k in (1, 2, 3):
        node_dir = run / "nodes" / f"node-{k}"
        out = run / f"node-{k}.witness"
        done = _fedsm(
            "node", "witness", "export", "--dir", str(node_dir), "--job", job_id, "--out", str(out)
        )
        assert done.returncode == 0, done.stderr
        files.append(out)
        key = _fedsm("node", "witness", "key", "--dir", str(node_dir))
        assert key.returncode == 0, key.stderr
        keys.append(f"node-{k}={key.stdout.strip().split()[-1]}")
    return log, files, keys


def _verify(log: Path, files: list[Path], keys: list[str] = ()) -> subprocess.CompletedProcess:
    args = [a for f in files for a in ("--witness", str(f))]
    args += [a for k in keys for a in ("--witness-key", k)]
    return _fedsm("replay", str(log), "--verify", *args)


def test_an_honest_log_verifies_against_every_hospital(exported, tmp_path: Path) -> None:
    log, files, keys = exported
    done = _verify(log, files, keys)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not checked: witnesses" not in done.stdout
    last = scan(log).records[-1]
    assert f"head: seq {last.seq} hash {last.hash.hex()}" in done.stdout


def test_the_last_round_cut_off_is_caught(exported, tmp_path: Path) -> None:
    log, files, keys = exported
    records = scan(log).records
    last_sent = max(r.seq for r in records if isinstance(r.event, ev.RoundSent))
    cut = tmp_path / "job.log"
    cut.write_bytes(log.read_bytes()[: records[last_sent - 1].offset])  # rounds 1-2 only
    alone = _fedsm("replay", str(cut), "--verify")
    assert alone.returncode == 0, alone.stdout  # the hash chain alone can not see it
    done = _verify(cut, files, keys)
    assert done.returncode == 1
    for k in (1, 2, 3):
        assert f"node-{k}" in done.stdout
    assert f"the log ends at seq {last_sent - 1}" in done.stdout
    assert records[-1].hash.hex() in done.stdout  # the witnessed final head, named


def test_an_early_record_rewritten_and_rechained_is_caught(exported, tmp_path: Path) -> None:
    log, files, keys = exported
    forged = tmp_path / "job.log"
    forged.write_bytes(log.read_bytes())
    records = scan(forged).records
    reply = next(r for r in records if isinstance(r.event, ev.ReplyReceived))

    def better_metrics(payload: dict) -> None:
        payload["data"]["metrics"] = {**payload["data"]["metrics"], "global_val_accuracy": 1.0}

    _rechain(forged, reply.seq, better_metrics)
    assert _fedsm("replay", str(forged), "--verify").returncode == 0  # re-chained: sound alone
    done = _verify(forged, files, keys)
    assert done.returncode == 1
    original = {r.seq: r.hash.hex() for r in records}
    rewritten = {r.seq: r.hash.hex() for r in scan(forged).records}
    named = [s for s in original if original[s] in done.stdout and rewritten[s] in done.stdout]
    assert named and min(named) >= reply.seq, done.stdout


def test_a_witness_file_edited_by_its_carrier_is_refused(exported, tmp_path: Path) -> None:
    log, files, keys = exported
    edited = tmp_path / "node-1.witness"
    text = files[0].read_text()
    last = scan(log).records[-1].hash.hex()
    edited.write_text(text.replace(last, "0" * 64))
    done = _verify(log, [edited, *files[1:]], keys)
    assert done.returncode == 1 and "refused" in done.stdout, done.stdout
