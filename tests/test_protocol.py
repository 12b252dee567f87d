"""PMI-1 wire protocol and per-job state machine: pure functions, recorded transcripts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkmpi.pmi import PMIJob, PMIProtocolError, format_command, parse_command
from sparkmpi.pmi.protocol import abort_message, parse_mcmd

TRANSCRIPTS = sorted((Path(__file__).parent / "transcripts").glob("*.txt"))


def test_parse_plain_command():
    c = parse_command(b"cmd=put kvsname=kvs_0 key=P0-businesscard value=abc=1\n")
    assert c.cmd == "put"
    assert c.args == {"kvsname": "kvs_0", "key": "P0-businesscard", "value": "abc=1"}


def test_escaped_values_round_trip():
    line = format_command("put", key="k", value="a b\\c")
    assert line == "cmd=put key=k value=a\\ b\\\\c\n"
    assert parse_command(line).args["value"] == "a b\\c"


def test_bare_keys_and_order_are_kept():
    line = format_command("set", ("size", 4), "flag")
    assert line == "cmd=set size=4 flag\n"
    assert parse_command(line).args == {"size": "4", "flag": None}


@pytest.mark.parametrize(
    "line",
    [
        b"hello\n",
        b"cmd=\n",
        b"cmd=put key=\n",
        b"cmd=put k!y=1\n",
        b"cmd=put \xff\xfe\n",
        b"cmd=get key=" + b"x" * 5000 + b"\n",
        b"cmd=put key=a\0b\n",
    ],
)
def test_malformed_lines_are_rejected(line):
    with pytest.raises(PMIProtocolError):
        parse_command(line)


def test_abort_message_keeps_spaces():
    c = parse_command("cmd=abort exitcode=3 message=application called MPI_Abort\n")
    assert abort_message(c) == "application called MPI_Abort"


def _replay(path: Path) -> None:
    job = PMIJob(job_id="test", size=2, secret="s")
    for rank in range(2):
        job.admit(rank, "node-a")
    expected: list[tuple[str, str]] = []
    got: list[tuple[int, str]] = []
    for raw in path.read_text().splitlines():
        if not raw or raw.startswith("#"):
            continue
        who, direction, line = raw.split(" ", 2)
        if direction == "<":
            got.extend((r.rank, r.line) for r in job.handle(int(who[1:]), parse_command(line), {}))
        else:
            expected.append((who[1:], line + "\n"))
    flat = []
    for who, line in expected:
        flat.extend([(0, line), (1, line)] if who == "*" else [(int(who), line)])
    assert sorted(got) == sorted(flat)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_recorded_transcript_replays(path):
    _replay(path)


def test_mapping_waits_until_every_rank_said_where_it_runs():
    job = PMIJob(job_id="j", size=2, secret="s")
    job.admit(0, "a")
    get = parse_command("cmd=get kvsname=sparkmpi_j key=PMI_process_mapping")
    assert job.handle(0, get, {}) == []
    released = job.admit(1, "b")
    assert [(r.rank, r.line) for r in released] == [
        (0, "cmd=get_result rc=0 value=(vector,(0,2,1))\n")
    ]


def test_unknown_command_gets_an_error_and_the_connection_stays():
    job = PMIJob(job_id="j", size=1, secret="s")
    job.admit(0, "a")
    (reply,) = job.handle(0, parse_command("cmd=frobnicate x=1"), {})
    assert not reply.close and "rc=-1" in reply.line


def test_wrong_kvsname_is_refused():
    job = PMIJob(job_id="j", size=1, secret="s")
    job.admit(0, "a")
    (reply,) = job.handle(0, parse_command("cmd=put kvsname=other key=k value=v"), {})
    assert not reply.close and reply.line.startswith("cmd=put_result rc=-1")


def test_spawn_blocks_make_one_request_after_the_last():
    job = PMIJob(job_id="j", size=1, secret="s")
    job.admit(0, "a")
    block = ["mcmd=spawn", "nprocs=2", "execname=/bin/true", "argcnt=1", "arg1=a b=c"]
    preput = ["preput_num=1", "preput_key_0=PARENT_ROOT_PORT_NAME", "preput_val_0=tag#0$"]
    info = ["info_num=1", "info_key_0=wdir", "info_val_0=/tmp"]
    first = parse_mcmd([*block, "totspawns=2", "spawnssofar=1", *preput, *info, "endcmd"])
    assert first.get("arg1") == "a b=c"
    assert job.handle(0, first, {}) == [] and job.spawns == []
    last = parse_mcmd([*block, "totspawns=2", "spawnssofar=2", "info_num=0", "endcmd"])
    assert job.handle(0, last, {}) == []
    ((rank, request),) = job.spawns
    assert rank == 0 and request.size == 4 and request.appnums() == [0, 0, 1, 1]
    assert request.preput == {"PARENT_ROOT_PORT_NAME": "tag#0$"}
    assert request.commands[0].argv == ("a b=c",)
    assert dict(request.commands[0].info)["wdir"] == "/tmp"


@pytest.mark.parametrize(
    "fields",
    [
        ["nprocs=1", "totspawns=1", "spawnssofar=2"],  # block beyond the total
        ["nprocs=0", "totspawns=1", "spawnssofar=1"],
        ["nprocs=1", "totspawns=1", "spawnssofar=1", "argcnt=2", "arg1=x"],  # arg2 missing
        ["nprocs=100000", "totspawns=1", "spawnssofar=1"],
    ],
)
def test_bad_spawn_blocks_get_an_error_reply_and_the_connection_stays(fields):
    job = PMIJob(job_id="j", size=1, secret="s")
    job.admit(0, "a")
    (reply,) = job.handle(0, parse_mcmd(["mcmd=spawn", "execname=x", *fields, "endcmd"]), {})
    assert reply.line.startswith("cmd=spawn_result rc=-1") and not reply.close
    assert job.spawns == []


@pytest.mark.parametrize(
    "lines",
    [
        ["mcmd=spawn", "nprocs=1"],  # no endcmd
        ["cmd=spawn", "endcmd"],
        ["mcmd=spawn", "no equals sign", "endcmd"],
        ["mcmd=spawn", *(f"arg{i}=x" for i in range(600)), "endcmd"],
    ],
)
def test_malformed_mcmd_blocks_are_refused(lines):
    with pytest.raises(PMIProtocolError):
        parse_mcmd(lines)


def test_name_publishing():
    job = PMIJob(job_id="j", size=1, secret="s")
    job.admit(0, "a")
    names: dict[str, str] = {}

    def ask(line: str) -> str:
        return job.handle(0, parse_command(line), names)[0].line

    assert ask("cmd=publish_name service=svc port=tag#0$") == "cmd=publish_result rc=0\n"
    assert ask("cmd=publish_name service=svc port=x").startswith("cmd=publish_result rc=-1")
    assert ask("cmd=lookup_name service=svc") == "cmd=lookup_result rc=0 port=tag#0$\n"
    assert ask("cmd=unpublish_name service=svc") == "cmd=unpublish_result rc=0\n"
    assert ask("cmd=lookup_name service=svc").startswith("cmd=lookup_result rc=-1")


def test_admission_rules():
    job = PMIJob(job_id="j", size=2, secret="s")
    job.admit(0, "a")
    from sparkmpi.pmi.job import JobRefused

    for rank, host in [(0, "a"), (2, "a"), (-1, "a"), (1, "bad host")]:
        with pytest.raises(JobRefused):
            job.admit(rank, host)
