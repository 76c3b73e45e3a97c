"""The log against its writer: ``fedsm replay --verify --witness FILE`` and ``--expect-head``.

One real demo run per module (3 nodes, 3 rounds, memory bus). The witness files are built
here from the log's real records with :func:`fedsm.core.witness.encode_witness`, as a node
would (heads at a few seqs, the last one included), so these tests do not depend on the
node side. Every tampering the researcher can do with a log alone (cut the last round off;
rewrite a record and re-chain all after it) passes ``--verify`` by itself and must fail
against the witnesses with a precise line: node, seq, witnessed hash, the log's hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from fedsm.audit.replay import add_arguments, run
from fedsm.audit.witness import WitnessAudit, read_chain
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.core.witness import (
    WitnessedHead,
    WitnessFile,
    decode_witness,
    encode_witness,
    signed_body,
)
from fedsm.log.format import HEADER_SIZE, encode_frame, genesis_hash
from fedsm.log.read import Record, scan

NODES, ROUNDS = 3, 3
NOT_CHECKED = (
    "not checked: witnesses: the log's integrity against its writer "
    "(give --witness FILE from each node)"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("witness") / "run"
    run_demo(run_dir, DemoConfig(nodes=NODES, rounds=ROUNDS), say=lambda _line: None)
    return run_dir


@pytest.fixture
def log(demo_run: Path, tmp_path: Path) -> Path:
    """A copy of the run's log, to tamper with."""
    copy = tmp_path / "job.log"
    shutil.copyfile(demo_run / "researcher" / "job.log", copy)
    return copy


def _records(log: Path) -> list[Record]:
    return scan(log).records


def _heads_of(log: Path) -> dict[int, str]:
    """seq -> hex chain hash of every record, seq 0 the genesis hash."""
    header = log.read_bytes()[:HEADER_SIZE]
    return {0: genesis_hash(header).hex(), **{r.seq: r.hash.hex() for r in _records(log)}}


def _created(log: Path) -> ev.JobCreated:
    event = _records(log)[0].event
    assert isinstance(event, ev.JobCreated)
    return event


def _witness(log: Path, node: str, seqs: list[int], **changes: object) -> WitnessFile:
    """What ``node`` would have kept of ``log``: the heads at ``seqs`` (as the log has them)."""
    heads = _heads_of(log)
    created = _created(log)
    w = WitnessFile(
        node_id=node,
        job_id=created.job_id,
        researcher_id=created.researcher_id,
        heads=tuple(WitnessedHead(seq, heads[seq], 1_800_000_000.0 + seq, "train") for seq in seqs),
    )
    return dataclasses.replace(w, **changes)  # type: ignore[arg-type]


def _seqs_for(log: Path, node: str) -> list[int]:
    """The heads a node receives: each round's train request (the head before its RoundSent),
    the plan-status request's, and the final one (job-end)."""
    records = _records(log)
    sent = [r.seq - 1 for r in records if isinstance(r.event, ev.RoundSent)]
    approval = [r.seq - 1 for r in records if isinstance(r.event, ev.ApprovalChecked)]
    return sorted({*approval, *sent, records[-1].seq})


def _write(path: Path, w: WitnessFile) -> Path:
    path.write_bytes(encode_witness(w))
    return path


def _node_files(log: Path, where: Path) -> list[Path]:
    nodes = _created(log).nodes
    return [_write(where / f"{n}.witness", _witness(log, n, _seqs_for(log, n))) for n in nodes]


def _replay(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    code = run(parser.parse_args(list(argv)), out=out, err=io.StringIO())
    return code, out.getvalue()


def _fedsm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _witness_args(files: list[Path]) -> list[str]:
    return [a for f in files for a in ("--witness", str(f))]


def _spans(log: Path) -> tuple[bytes, list[tuple[int, int]]]:
    data = log.read_bytes()
    spans = []
    for r in _records(log):
        (length,) = struct.unpack_from("<I", data, r.offset)
        spans.append((r.offset, r.offset + 8 + length))
    return data, spans


def _rechain(log: Path, seq: int, change: object) -> None:
    """Change record ``seq``'s payload with ``change(payload)`` and re-chain every record
    after it (each ``prev`` set to the new hash of the one before): what a researcher who
    holds the log can do. Same header, so the same genesis hash."""
    data, spans = _spans(log)
    out = [data[:HEADER_SIZE]]
    prev = genesis_hash(data[:HEADER_SIZE])
    for i, (start, end) in enumerate(spans, start=1):
        payload = msgpack.unpackb(data[start + 8 : end], raw=False)
        if i == seq:
            change(payload)  # type: ignore[operator]
        payload["prev"] = prev
        frame = encode_frame(msgpack.packb(payload, use_bin_type=True))
        prev = hashlib.blake2b(frame, digest_size=32).digest()
        out.append(frame)
    log.write_bytes(b"".join(out))


# --------------------------------------------------------------------------- the head


def test_the_timeline_ends_with_the_head(log: Path) -> None:
    result = _fedsm(str(log))
    assert result.returncode == 0, result.stderr
    last = _records(log)[-1]
    lines = result.stdout.splitlines()
    assert lines[-1] == f"head: seq {last.seq} hash {last.hash.hex()}"
    assert len(lines) == last.seq + 1
    rows = json.loads(_fedsm(str(log), "--json").stdout)  # the timeline's list, as ever
    assert [r["seq"] for r in rows] == list(range(1, last.seq + 1))
    assert rows[-1]["hash"] == last.hash.hex()  # each row has its chain hash: the last, the head
    code, text = _replay(str(log), "--verify")
    assert code == 0 and f"head: seq {last.seq} hash {last.hash.hex()}\n" in text
    code, text = _replay(str(log), "--verify", "--json")
    assert json.loads(text)["head"] == {"seq": last.seq, "hash": last.hash.hex()}


def test_expect_head_right_and_wrong(log: Path) -> None:
    heads = _heads_of(log)
    last = max(heads)
    right = _fedsm(str(log), "--expect-head", f"7:{heads[7]}")
    assert right.returncode == 0, right.stdout + right.stderr
    assert f"expected head seq 7 hash {heads[7]}: on this log's chain" in right.stdout
    code, text = _replay(str(log), "--verify", "--expect-head", f"{last}:{heads[last].upper()}")
    assert code == 0 and f"the expected head seq {last} is on its chain" in text, text
    code, _text = _replay(str(log), "--expect-head", f"0:{heads[0]}")  # the genesis hash
    assert code == 0

    wrong = _fedsm(str(log), "--verify", "--expect-head", f"7:{heads[8]}")
    assert wrong.returncode == 1
    assert (
        f"seq 7: head: the log's record seq 7 is not the expected one: the log was rewritten "
        f"at or before seq 7\n    expected: seq 7 hash {heads[8]}\n"
        f"    found:    seq 7 hash {heads[7]}\n"
    ) in wrong.stdout
    beyond = _fedsm(str(log), "--expect-head", f"{last + 3}:{heads[1]}")
    assert beyond.returncode == 1
    assert f"ERROR: expected head seq {last + 3} hash {heads[1]}: the log ends at seq {last}" in (
        beyond.stdout
    )
    as_json = _fedsm(str(log), "--json", "--expect-head", f"{last + 3}:{heads[1]}")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)[-1]["seq"] == last
    assert f"the log ends at seq {last}" in as_json.stderr

    bad = _fedsm(str(log), "--expect-head", "7:nothex")
    assert bad.returncode == 2 and "SEQ:HASH" in bad.stderr


# --------------------------------------------------------------------------- witnesses


def test_without_witnesses_the_check_is_listed_not_checked(log: Path) -> None:
    result = _fedsm(str(log), "--verify")
    assert result.returncode == 0, result.stdout
    assert NOT_CHECKED in result.stdout.splitlines()
    report = json.loads(_fedsm(str(log), "--verify", "--json").stdout)
    assert report["ok"] is True and "witnesses" in [c["check"] for c in report["not_checked"]]


def test_an_untouched_run_verifies_against_its_witnesses(log: Path, tmp_path: Path) -> None:
    files = _node_files(log, tmp_path)
    before = {f: f.read_bytes() for f in [log, *files]}
    result = _fedsm(str(log), "--verify", *_witness_args(files))
    assert result.returncode == 0, result.stdout
    assert "not checked: witnesses" not in result.stdout
    last = _records(log)[-1].seq
    assert f"witnessed by 3 node(s) [node-1,node-2,node-3] up to seq {last}" in result.stdout
    report = json.loads(_fedsm(str(log), "--verify", "--json", *_witness_args(files)).stdout)
    assert report["ok"] is True
    # the one note: no key was pinned, so the files prove only what their carrier wrote
    assert [f["what"] for f in report["findings"] if not f["error"]] == [
        "witnesses: no key pinned for ['node-1', 'node-2', 'node-3']: their files prove only "
        "what whoever handed them over wrote (pin each node's published key with "
        "--witness-key NODE=HEX)"
    ]
    assert not [f for f in report["findings"] if f["error"]]
    assert [w["node_id"] for w in report["witnesses"]] == ["node-1", "node-2", "node-3"]
    assert all(w["refused"] is None and w["highest_seq"] == last for w in report["witnesses"])
    # Read-only: neither the log nor the witness files were touched.
    assert {f: f.read_bytes() for f in before} == before


def test_the_last_round_cut_off_fails_against_the_witnesses(log: Path, tmp_path: Path) -> None:
    files = _node_files(log, tmp_path)
    heads = _heads_of(log)
    last = max(heads)
    cut = next(r for r in _records(log) if isinstance(r.event, ev.RoundSent) and r.event.round == 3)
    with open(log, "r+b") as f:
        f.truncate(cut.offset)
    kept = cut.seq - 1

    alone = _fedsm(str(log), "--verify")
    assert alone.returncode == 0, alone.stdout  # the chain alone can't tell

    result = _fedsm(str(log), "--verify", *_witness_args(files))
    assert result.returncode == 1, result.stdout
    for node in ("node-1", "node-2", "node-3"):
        assert (
            f"ERROR: offset {cut.offset} seq {last}: witness of {node} ({tmp_path / node}"
            f".witness): {node} witnessed seq {last}, but the log ends at seq {kept}"
        ) in result.stdout
    assert f"    expected: seq {last} hash {heads[last]} (received " in result.stdout
    assert f"    found:    the log ends at seq {kept}\n" in result.stdout
    assert "3 finding(s); the log does not verify" in result.stdout

    report = json.loads(_fedsm(str(log), "--verify", "--json", *_witness_args(files)).stdout)
    errors = [f for f in report["findings"] if f["error"]]
    assert {(f["check"], f["seq"], f["found"]) for f in errors} == {
        ("witnesses", last, f"the log ends at seq {kept}")
    }


def test_a_rewritten_and_rechained_record_fails_against_the_witnesses(
    log: Path, tmp_path: Path
) -> None:
    files = _node_files(log, tmp_path)
    heads = _heads_of(log)
    reply = next(r for r in _records(log) if isinstance(r.event, ev.ReplyReceived))

    def better(payload: dict) -> None:
        payload["data"]["metrics"]["global_val_accuracy"] = 0.99

    _rechain(log, reply.seq, better)
    assert _records(log)[reply.seq - 1].event.metrics["global_val_accuracy"] == 0.99
    alone = _fedsm(str(log), "--verify")
    assert alone.returncode == 0, alone.stdout  # a valid chain: the log alone passes

    new = _heads_of(log)
    witnessed = _seqs_for(log, "node-1")
    first = min(s for s in witnessed if s >= reply.seq)  # the first witnessed head after it
    agree = max(s for s in witnessed if s < reply.seq)
    assert heads[first] != new[first] and heads[agree] == new[agree]
    result = _fedsm(str(log), "--verify", *_witness_args(files))
    assert result.returncode == 1, result.stdout
    assert (
        f"seq {first}: witness of node-1 ({tmp_path / 'node-1.witness'}): the log's record seq "
        f"{first} is not the one node-1 witnessed: the log was rewritten after seq {agree} "
        f"(witnessed and on the chain) and at or before seq {first}"
    ) in result.stdout
    assert f"    expected: seq {first} hash {heads[first]} (received " in result.stdout
    assert f"    found:    seq {first} hash {new[first]}\n" in result.stdout
    assert "3 finding(s); the log does not verify" in result.stdout


def test_a_log_written_anew_fails_against_the_witnesses(log: Path, tmp_path: Path) -> None:
    """The same events in a new log (another log id, so another genesis hash)."""
    files = _node_files(log, tmp_path)
    from fedsm.log.writer import EventLog

    items = [(r.ts, r.event) for r in _records(log)]
    log.unlink()
    with EventLog.open(log, durability="never") as out:
        for ts, event in items:
            out.append(event, ts=ts)
    code, text = _replay(str(log), "--verify", *_witness_args(files))
    assert code == 1 and "the log was rewritten at or before seq" in text, text


def test_a_witness_edited_by_hand_is_refused(log: Path, tmp_path: Path) -> None:
    path = _node_files(log, tmp_path)[0]
    doc = json.loads(path.read_bytes())
    doc["heads"][-1]["hash"] = "0" * 64  # the checksum stays the old one
    path.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    result = _fedsm(str(log), "--verify", "--witness", str(path))
    assert result.returncode == 1, result.stdout
    assert (
        f"ERROR: offset 0 seq 0: witness {path} refused: the witness file of node-1 was "
        "edited: its checksum"
    ) in result.stdout
    foreign = tmp_path / "notes.txt"
    foreign.write_text("seq 20 looked fine to me\n")
    code, text = _replay(str(log), "--verify", "--witness", str(foreign))
    assert code == 1 and f"witness {foreign} refused: not a witness file" in text
    code, text = _replay(str(log), "--verify", "--witness", str(tmp_path / "missing"))
    assert code == 1 and "refused: it can't be read" in text


def test_a_witness_of_another_job_is_refused(log: Path, tmp_path: Path) -> None:
    other = _write(
        tmp_path / "other.witness", _witness(log, "node-1", [1, 2], job_id="job-elsewhere")
    )
    code, text = _replay(str(log), "--verify", "--witness", str(other))
    job = _created(log).job_id
    assert code == 1
    assert f"witness {other} refused: it is of job job-elsewhere, this log is of job {job}" in text
    assert f"    expected: job {job}\n    found:    job job-elsewhere\n" in text


def _keypair() -> tuple[object, str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw().hex()


def _signed(w: WitnessFile, private: object, public_hex: str) -> WitnessFile:
    w = dataclasses.replace(w, public_key=public_hex, signature=None)
    return dataclasses.replace(w, signature=private.sign(signed_body(w)).hex())  # type: ignore[attr-defined]


def test_signed_witnesses_forged_signatures_and_pinned_keys(log: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    private, public = _keypair()
    _other_private, other_public = _keypair()
    seqs = _seqs_for(log, "node-2")
    good = _write(
        tmp_path / "good.witness", _signed(_witness(log, "node-2", seqs), private, public)
    )
    assert decode_witness(good.read_bytes()).signature is not None

    ok = _fedsm(str(log), "--verify", "--witness", str(good), "--witness-key", f"node-2={public}")
    assert ok.returncode == 0, ok.stdout
    assert "(1 of 1 file(s) signed, 1 by a pinned key)" in ok.stdout
    code, text = _replay(str(log), "--verify", "--witness", str(good))  # signed, no key pinned
    assert code == 0, text

    # Forged: the heads changed after signing, the checksum recomputed, the signature kept.
    signed = decode_witness(good.read_bytes())
    forged_w = dataclasses.replace(
        signed, heads=signed.heads[:-1] + (dataclasses.replace(signed.heads[-1], seq=2),)
    )
    forged = _write(tmp_path / "forged.witness", forged_w)
    result = _fedsm(str(log), "--verify", "--witness", str(forged))
    assert result.returncode == 1
    assert f"witness {forged} refused: its signature does not verify" in result.stdout

    flipped = _write(
        tmp_path / "flipped.witness",
        dataclasses.replace(
            signed, signature=("0" if signed.signature[0] != "0" else "1") + signed.signature[1:]
        ),
    )
    code, text = _replay(str(log), "--verify", "--witness", str(flipped))
    assert code == 1 and "its signature does not verify" in text

    wrong_key = _fedsm(
        str(log), "--verify", "--witness", str(good), "--witness-key", f"node-2={other_public}"
    )
    assert wrong_key.returncode == 1
    assert (
        f"witness {good} refused: it is signed with another key than the one pinned for node-2"
    ) in wrong_key.stdout
    assert f"    expected: public key {other_public}\n    found:    public key {public}\n" in (
        wrong_key.stdout
    )

    unsigned = _write(tmp_path / "unsigned.witness", _witness(log, "node-2", seqs))
    code, text = _replay(
        str(log), "--verify", "--witness", str(unsigned), "--witness-key", f"node-2={public}"
    )
    assert (
        code == 1 and "refused: it is not signed, but --witness-key pins a key for node-2" in text
    )


def test_argument_errors(log: Path, tmp_path: Path) -> None:
    path = _node_files(log, tmp_path)[0]
    bad_key = _fedsm(str(log), "--verify", "--witness", str(path), "--witness-key", "node-1=xyz")
    assert bad_key.returncode == 2 and "NODE=HEXKEY" in bad_key.stderr
    no_verify = _fedsm(str(log), "--witness", str(path))
    assert no_verify.returncode == 2 and "--witness is only used with --verify" in no_verify.stderr


def test_what_a_carrier_could_leave_out_fails_and_the_rest_are_notes(
    log: Path, tmp_path: Path
) -> None:
    """The job ended, so its final head went to every node: witnesses that stop before it are
    old exports (an error: the records after them are the researcher's word alone); a pinned
    node whose file is missing is an error; a node without a file is a note."""
    early = _write(tmp_path / "early.witness", _witness(log, "node-3", [0, 4, 9]))
    audit = WitnessAudit([early], {"node-1": "ab" * 32})
    findings = audit.check(log)
    errors = [f.what for f in findings if f.error]
    assert len(errors) == 2, findings
    assert any("come after the highest head" in w and "fresh exports" in w for w in errors)
    assert any("a key is pinned for node-1, but no witness file" in w for w in errors)
    whats = [f.what for f in findings]
    last = read_chain(log).last_seq
    assert any(f"records seq 10..{last} come after the highest head" in w for w in whats)
    assert any("a key is pinned for node-1, but no witness file" in w for w in whats)
    assert any("no witness file of node-2, one of the job's nodes" in w for w in whats)
    assert not any("no witness file of node-1," in w for w in whats)  # named once, above
