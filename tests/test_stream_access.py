"""A stream on a shared network: librdkafka settings reach every Kafka client (TLS for real, on
a local broker), and ZeroMQ CURVE lets only authorized producers through."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from sparkmpi.cli import main
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming import kafka_transport
from sparkmpi.streaming.access import (
    CurveKeys,
    StreamAccess,
    load_curve_keys,
    read_kafka_config,
)
from sparkmpi.streaming.broker import TansuBroker
from sparkmpi.streaming.endpoints import check, open_sink, open_source
from sparkmpi.streaming.kafka_transport import StreamError, read_range
from sparkmpi.streaming.protocol import Frame, ScanEnd, ScanStart, decode
from sparkmpi.streaming.zmq_transport import ZmqSink, ZmqSource

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# --kafka-config


def test_a_properties_file_is_read(tmp_path):
    path = tmp_path / "kafka.properties"
    path.write_text(
        "# facility broker\n\n"
        "security.protocol=SASL_SSL\n"
        "  sasl.mechanism = PLAIN  \n"
        "sasl.password=a=b#c\n"
        "   # indented comment\n"
        "ssl.ca.location=/etc/ca.pem\n"
    )
    assert read_kafka_config(path) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.password": "a=b#c",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert StreamAccess.load(kafka_config=path).kafka_config["sasl.mechanism"] == "PLAIN"


@pytest.mark.parametrize("line", ["security.protocol", "=SSL", "ssl ca=x"])
def test_a_bad_line_is_one_line_naming_file_and_line(tmp_path, capsys, line):
    path = tmp_path / "kafka.properties"
    path.write_text(f"# ok\nclient.id=x\n{line}\n")
    with pytest.raises(StreamError, match=rf"^{path}:3: expected key=value, got "):
        read_kafka_config(path)
    args = ["--scan", "none.cxi", "--to", "kafka://127.0.0.1:9/t", "--kafka-config", str(path)]
    rc = main(["stream", "produce", *args])
    assert rc == 1
    assert one_line_error(capsys).startswith(f"spark-mpi stream produce: {path}:3: expected")


@pytest.mark.parametrize(
    "key", ["bootstrap.servers", "group.id", "enable.auto.commit", "metadata.broker.list"]
)
def test_keys_the_pipeline_sets_are_refused(tmp_path, key):
    path = tmp_path / "kafka.properties"
    path.write_text(f"client.id=x\n{key}=y\n")
    with pytest.raises(StreamError, match=rf"^{path}:2: {key} is set by the pipeline itself"):
        read_kafka_config(path)
    with pytest.raises(StreamError, match="is set by the pipeline itself"):
        StreamAccess({key: "y"})


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(StreamError, match=r"cannot read the Kafka settings \(No such file"):
        read_kafka_config(tmp_path / "absent.properties")


# --zmq-keys


@pytest.fixture
def keys(tmp_path, capsys):
    directory = tmp_path / "keys"
    assert main(["stream", "keys", str(directory)]) == 0
    printed = capsys.readouterr().out
    assert str(directory / "server.key_secret") in printed
    return directory


def test_the_keys_command_makes_the_layout(keys, capsys):
    for name in ("server.key_secret", "client.key_secret"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    curve = load_curve_keys(keys)
    assert curve.server_secret and curve.client_secret and curve.client_public
    assert curve.server_pair()[0] == curve.server_public

    assert main(["stream", "keys", str(keys)]) == 1  # never overwrites keys
    assert "already holds keys" in one_line_error(capsys)

    assert main(["stream", "keys", str(keys), "--producer", "beamline2"]) == 0
    own = keys / "producers" / "beamline2"
    assert (own / "client.key_secret").stat().st_mode & 0o777 == 0o600
    assert (own / "server.key").read_bytes() == (keys / "server.key").read_bytes()
    assert (keys / "authorized" / "beamline2.key").read_bytes() == (own / "client.key").read_bytes()
    producer = load_curve_keys(own)
    assert producer.server_secret is None and producer.client_pair()
    with pytest.raises(StreamError, match=r"no server\.key_secret"):
        check("zmq://127.0.0.1:9", StreamAccess(curve=producer))  # a driver needs the secret


def test_a_secret_key_open_to_others_is_refused(keys, capsys):
    (keys / "client.key_secret").chmod(0o644)
    with pytest.raises(StreamError, match=r"mode 0644\); chmod 600 it$"):
        load_curve_keys(keys)
    args = ["--scan", "none.cxi", "--to", "zmq://127.0.0.1:9", "--zmq-keys", str(keys)]
    rc = main(["stream", "produce", *args])
    assert rc == 1
    assert "client.key_secret: secret key is open to group or others" in one_line_error(capsys)


def wait_for_event(monitor: zmq.Socket, events: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        event = recv_monitor_message(monitor)["event"]
        if event & events:
            return event
    raise AssertionError(f"no event {events!r} within {timeout} s")


def start(scan_id: str) -> ScanStart:
    return ScanStart(scan_id, 1, (1, 1), "float32")


def test_only_producers_with_authorized_keys_get_through(keys, tmp_path):
    assert main(["stream", "keys", str(keys), "--producer", "beamline2"]) == 0
    curve = load_curve_keys(keys)
    port = free_port()
    keyless = ZmqSink("127.0.0.1", port)  # before the driver binds: no event can be missed
    monitor = keyless.socket.get_monitor_socket()
    keyless.send(start("keyless"))
    source = ZmqSource("127.0.0.1", port, log=print, curve=curve)
    try:
        wait_for_event(monitor, HANDSHAKE_FAILED)  # a keyless producer is never let in

        public, secret = zmq.curve_keypair()
        unknown = CurveKeys(tmp_path, curve.server_public, None, public, secret)
        wrong_server = CurveKeys(tmp_path, public, None, curve.client_public, curve.client_secret)
        for scan_id, keys_used in (("unknown", unknown), ("wrong-server", wrong_server)):
            stranger = ZmqSink("127.0.0.1", port, curve=keys_used)
            stranger.send(start(scan_id))
            with pytest.raises(StreamError, match="refused this producer's CURVE handshake"):
                stranger.close()  # returns once the driver has refused it

        for directory, scan_id in ((keys, "authorized"), (keys / "producers/beamline2", "b2")):
            access = StreamAccess(curve=load_curve_keys(directory))
            sink = open_sink(f"zmq://127.0.0.1:{port}", access)
            sink.send(start(scan_id))
            sink.close()  # returns once the driver accepted it
            assert source.wait_for_scan(timeout=20).scan_id == scan_id
        assert source.wait_for_scan(timeout=0.2) is None  # nothing from the refused two
    finally:
        keyless.socket.disable_monitor()
        monitor.close(linger=0)
        keyless.socket.close(linger=0)
        keyless.context.term()
        source.close()


# --kafka-config with TLS, on a local broker


@pytest.fixture
def tls_broker(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    request = ["-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    request += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    request += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(["openssl", "req", *request], check=True, capture_output=True)
    with TansuBroker(cert=cert, key=key) as broker:
        yield broker, cert


def test_kafka_settings_reach_every_client_over_tls(tls_broker, tmp_path):
    broker, cert = tls_broker
    properties = tmp_path / "kafka.properties"
    properties.write_text(f"security.protocol=ssl\nssl.ca.location={cert}\n")
    access = StreamAccess.load(kafka_config=properties)
    url = f"{broker.url}/scans"
    check(url, access)
    sink = open_sink(url, access)
    source = open_source(url, log=print, access=access)
    try:
        sink.send(ScanStart("tls", 6, (2, 2), "float32"))
        for index in range(6):
            sink.send(Frame("tls", index, np.full((2, 2), index, np.float32), time.time()))
        sink.send(ScanEnd("tls", time.time()))
        sink.close()
        scan = source.wait_for_scan(timeout=30)
        assert scan.scan_id == "tls"
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while not source.complete():
            assert time.monotonic() < deadline, f"frames read: {sorted(seen)}"
            items = source.poll(0.5)
            reached = {}
            for item in items:  # what each rank does, with the consumer the range asks for
                assert ("security.protocol", "ssl") in item.config
                records, reached[item.partition] = read_range(item)
                seen += [decode(header, payload, scan).index for header, payload in records]
            source.advance(reached, items)
        assert sorted(seen) == list(range(6))
        source.publish_result({"scan_id": "tls", "batch": 1})
    finally:
        source.close()
        for reader in kafka_transport._consumers.values():  # the readers read_range kept
            reader.close()
        kafka_transport._consumers.clear()

    with pytest.raises(StreamError) as refused:
        open_source(url, log=print)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith(f"kafka://{broker.bootstrap}: broker not reachable")
