"""Which driver address the PMI and control listeners bind and advertise (the documented rule)."""

from __future__ import annotations

import pytest

from helpers import spark_mpi
from sparkmpi.cli import parse_conf
from sparkmpi.runner.addresses import driver_host_for, listen_address, master_host, route_source


def conf(**settings: str):
    table = {key.replace("_", "."): value for key, value in settings.items()}
    return table.get


def test_an_explicit_address_wins():
    address = listen_address("spark://h:7077", conf(spark_driver_host="10.1.2.3"), "127.0.0.1")
    assert (address.bind, address.advertise) == ("127.0.0.1", "127.0.0.1")
    assert address.rule.startswith("explicit")


def test_local_mode_stays_on_loopback():
    address = listen_address("local[4]", conf(spark_driver_host="10.1.2.3"))
    assert (address.bind, address.advertise) == ("127.0.0.1", "127.0.0.1")


def test_a_cluster_uses_spark_driver_host_and_its_bind_address():
    plain = listen_address("spark://nowhere.invalid:7077", conf(spark_driver_host="127.0.0.1"))
    assert (plain.bind, plain.advertise, plain.rule) == (
        "127.0.0.1",
        "127.0.0.1",
        "spark.driver.host",
    )
    behind_nat = listen_address(
        "yarn", conf(spark_driver_host="localhost", spark_driver_bindAddress="0.0.0.0")
    )
    assert (behind_nat.bind, behind_nat.advertise) == ("0.0.0.0", "localhost")


def test_a_driver_host_that_does_not_resolve_is_one_clear_error():
    with pytest.raises(ValueError, match=r"'no-such-host\.invalid' does not resolve"):
        listen_address("spark://h:1", conf(spark_driver_host="no-such-host.invalid"))


@pytest.mark.parametrize(
    ("master", "host"),
    [("spark://10.0.0.5:7077", "10.0.0.5"), ("spark://a:1,b:2", "a"), ("local[2]", None)],
)
def test_master_host(master, host):
    assert master_host(master) == host


def test_route_source_to_this_machine_is_loopback():
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert driver_host_for("spark://127.0.0.1:7077") == "127.0.0.1"
    assert driver_host_for("local[2]") is None


def test_conf_pairs():
    assert parse_conf(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_conf(["novalue"])


def test_spark_mpi_run_refuses_a_bad_conf_in_one_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print(1)\n")
    done = spark_mpi("run", "--conf", "oops", str(script))
    assert done.returncode == 2
    assert done.stderr.strip() == "spark-mpi run: --conf 'oops': expected KEY=VALUE"
