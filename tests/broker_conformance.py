"""Broker conformance with kafka-python, a client that shares no code with librdkafka.

Run by tests/broker_conformance.rs (`kafka_python_sees_the_same`), which has
produced the records with rdkafka (linger.ms 50, so batches hold many
records) and passes their keys by partition and offset in --expected. Checks:

- a fetch starting at several offsets inside batches of every partition
  returns every record from exactly there, in order, with the produced keys;
- a group member in its own process, SIGKILLed, and a new member joining:
  the new member gets every partition within the session timeout;
- committed offsets (standalone and from the active member) read back as
  written.

Prints one `PROBLEM ...` line per problem and exits 1 if there is any.
`member` mode (used by the script itself) joins the group, prints
`assigned P,P,...` after each assignment change and polls until killed.
"""

import argparse
import io
import json
import logging
import subprocess
import sys
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

API_VERSION = (2, 0)


def consumer(args, **kw):
    return KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        api_version=API_VERSION,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        **kw,
    )


def seek_targets(n):
    return sorted({o for o in (1, 7, n // 3 + 1, n // 2 + 3, n - 2) if 0 < o < n})


def read_from(args, partition, start, keys):
    c = consumer(args)
    tp = TopicPartition(args.topic, partition)
    try:
        c.assign([tp])
        c.seek(tp, start)
        nxt, end = start, len(keys)
        deadline = time.time() + 10
        while nxt < end:
            if time.time() > deadline:
                return f"only offsets {start}..{nxt} of {start}..{end} arrived within 10 s"
            for records in c.poll(timeout_ms=200).values():
                for r in records:
                    key = (r.key or b"").decode("utf-8", "replace")
                    if r.offset != nxt:
                        what = "the first record returned" if nxt == start else "the next record"
                        return (
                            f"{what} is at offset {r.offset} instead of {nxt} "
                            f"({r.offset - nxt} records skipped; key {key!r})"
                        )
                    if key != keys[nxt]:
                        return f"offset {nxt} holds key {key!r}, but {keys[nxt]!r} was produced there"
                    nxt += 1
                    if nxt == end:
                        break
        return None
    finally:
        c.close()


def check_seeks(args, expected):
    problems = []
    for partition in sorted(expected):
        keys = expected[partition]
        for start in seek_targets(len(keys)):
            p = read_from(args, partition, start, keys)
            if p:
                problems.append(f"partition {partition}: seek to offset {start}: {p}")
    return problems


def commit_and_read_back(args, committer, group, written, what):
    committer.commit({TopicPartition(args.topic, p): OffsetAndMetadata(o, "", -1) for p, o in written.items()})
    reader = consumer(args, group_id=group)
    try:
        problems = []
        for p, o in written.items():
            back = reader.committed(TopicPartition(args.topic, p))
            if back != o:
                problems.append(f"commit: {what}: partition {p}: wrote offset {o}, read back {back}")
        return problems
    finally:
        reader.close()


def check_commits(args, partitions):
    group = args.group + "-commits"
    committer = consumer(args, group_id=group)
    try:
        problems = []
        for rnd in range(2):
            written = {p: 13 + 100 * rnd + 5 * p for p in partitions}
            problems += commit_and_read_back(args, committer, group, written, f"standalone commit #{rnd + 1}")
        return problems
    finally:
        committer.close()


def group_consumer(args, group):
    c = consumer(
        args,
        group_id=group,
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=1000,
    )
    # kafka-python 3.0.12 does not fetch a subscribed topic's metadata before
    # it joins: elected leader without it, it assigns nothing, fetches it,
    # rejoins, and at times never applies the next assignment (the member then
    # holds no partition for good). Fetched first, as an application would.
    c.partitions_for_topic(args.topic)
    c.subscribe([args.topic])
    return c


def owned(c):
    return sorted(tp.partition for tp in c.assignment() if tp.topic == args_topic[0])


args_topic = [None]


def member(args):
    c = group_consumer(args, args.group)
    last = None
    while True:
        c.poll(timeout_ms=100)
        now = owned(c)
        if now != last:
            print("assigned " + ",".join(map(str, now)), flush=True)
            last = now


def check_failover(args, partitions, expected):
    group = args.group + "-failover"
    cmd = [sys.executable, __file__, "member"] + sys.argv[1:] + ["--member-group", group]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    got, deadline = [], time.time() + 30
    try:
        while got != partitions and time.time() < deadline:
            line = first.stdout.readline()
            if not line:
                break
            if line.startswith("assigned "):
                got = [int(p) for p in line.split()[1].split(",") if p] if len(line.split()) > 1 else []
    finally:
        first.kill()  # SIGKILL
        first.wait()
    if got != partitions:
        return [f"group: the only member of a new group got partitions {got} of {partitions} in 30 s"]
    killed = time.time()
    # kafka-python's own account of the new member's group protocol,
    # printed when the handover fails.
    trace = io.StringIO()
    handler = logging.StreamHandler(trace)
    handler.setFormatter(logging.Formatter("%(relativeCreated)8.0f ms %(name)s %(levelname)s %(message)s"))
    log = logging.getLogger("kafka")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    second = group_consumer(args, group)
    try:
        limit = (args.session_timeout_ms + args.failover_slack_ms) / 1000
        have = []
        while time.time() < killed + limit + 30:
            second.poll(timeout_ms=100)
            have = owned(second)
            if have == partitions:
                break
        took = time.time() - killed
        print(f"kafka-python group: after SIGKILL of the member, a new member had every partition after {took:.1f} s")
        if took > limit:
            print("kafka-python's log of the new member (time since the script started):")
            print("\n".join(trace.getvalue().splitlines()[-200:]))
        if have != partitions:
            return [
                f"group: {took:.0f} s after the only member was SIGKILLed, a new member still has partitions "
                f"{have} of {partitions} (session timeout {args.session_timeout_ms / 1000:.0f} s)"
            ]
        problems = []
        if took > limit:
            problems.append(
                f"group: a new member got the partitions of a SIGKILLed one after {took:.1f} s, more than the "
                f"session timeout + {args.failover_slack_ms / 1000:.0f} s"
            )
        written = {p: len(expected[p]) // 2 + 2 * p for p in partitions}
        problems += commit_and_read_back(args, second, group, written, "the active member's commit")
        return problems
    finally:
        second.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="check", choices=["check", "member"])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    ap.add_argument("--failover-slack-ms", type=int, default=5000)
    ap.add_argument("--member-group")
    args = ap.parse_args()
    args_topic[0] = args.topic
    if args.mode == "member":
        args.group = args.member_group
        member(args)
        return 0
    with open(args.expected) as f:
        expected = {int(p): keys for p, keys in json.load(f).items()}
    partitions = sorted(expected)
    problems = []
    problems += check_seeks(args, expected)
    problems += check_commits(args, partitions)
    problems += check_failover(args, partitions, expected)
    for p in problems:
        print("PROBLEM " + p, flush=True)
    if not problems:
        print(f"kafka-python: every check passed ({len(partitions)} partitions, {sum(map(len, expected.values()))} records)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
