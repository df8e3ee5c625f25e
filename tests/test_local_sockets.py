"""Local Unix sockets between co-located TCP workers: used when reachable, TCP when
not (nobody listening, an impostor, another machine), and turned off on request."""

from __future__ import annotations

import logging

import pytest
from conftest import open_abstract

import actorgrad as ag
from actorgrad.runtime import Worker, current_worker, transport

pytestmark = pytest.mark.skipif(
    not transport.local_sockets(), reason="no abstract Unix sockets on this platform"
)


def add(a, b):
    return a + b


def kind_of_connection_to(peer: str) -> str:
    """Run on a worker: call ``peer`` once, return the kind of the connection used."""
    return current_worker()._out[peer].kind


async def kind_back_to(peer: str) -> str:
    """Run on a worker: call back ``peer`` (a fresh connection from this worker)."""
    assert await ag.rpc(peer, add, (1, 1)) == 2
    return current_worker()._out[peer].kind


@pytest.mark.parametrize(("transport_name", "kind"), [("unix", "unix"), ("tcp", "tcp")])
async def test_in_process_cluster_uses_the_transport_it_was_asked_for(transport_name, kind):
    async with ag.local_cluster(2, transport=transport_name) as c:
        assert await ag.rpc("w1", add, (2, 3)) == 5
        assert c.driver._out["w1"].kind == kind
        assert await ag.rpc("w1", kind_back_to, ("w2",)) == kind
        assert bool(c.driver.local_address) == (kind == "unix")


async def test_process_workers_talk_over_local_sockets_both_ways():
    async with ag.local_cluster(2, processes=True) as c:
        assert await ag.rpc("w1", add, (2, 3)) == 5
        assert c.driver._out["w1"].kind == "unix"
        # w1 -> driver and w1 -> w2 are connections opened by the worker process
        assert await ag.rpc("w1", kind_back_to, ("driver",)) == "unix"
        assert await ag.rpc("w1", kind_back_to, ("w2",)) == "unix"


async def _late_worker(c, local_address: str) -> Worker:
    """A worker joining ``c`` that advertises ``local_address`` as its local socket."""
    w = Worker("late", token=c.driver.token, local_sockets=True)
    await w.start()
    w.local_address = local_address
    await w.join(c.address)
    return w


async def test_nobody_on_the_advertised_local_socket_falls_back_to_tcp():
    async with ag.local_cluster(0, transport="unix") as c:
        dead = f"actorgrad/{transport.machine_key()}/{'0' * 16}"
        late = await _late_worker(c, dead)
        try:
            assert await ag.rpc("late", add, (4, 5)) == 9
            assert c.driver._out["late"].kind == "tcp"
        finally:
            await late.shutdown()


async def test_an_impostor_on_the_local_socket_fails_the_handshake_and_tcp_is_used(caplog):
    # (the impostor closes the connection without its MAC, as a server does to a client
    # whose token is wrong: for us, a failed local socket, like a dead one)
    caplog.set_level(logging.DEBUG, "actorgrad.runtime")
    async with ag.local_cluster(0, transport="unix") as c:
        impostor = Worker("impostor", token="not-the-cluster-token", local_sockets=True)
        await impostor.start()
        late = await _late_worker(c, impostor.local_address)
        try:
            assert await ag.rpc("late", add, (4, 5)) == 9
            assert c.driver._out["late"].kind == "tcp"
            assert "using TCP" in caplog.text
        finally:
            await late.shutdown()
            await impostor.shutdown()


async def test_a_local_socket_of_another_machine_is_not_tried():
    async with ag.local_cluster(0, transport="unix") as c:
        elsewhere = f"actorgrad/other-boot-1234/{'1' * 16}"
        assert not transport.local_reachable(elsewhere)
        assert not transport.local_reachable("not/a-name")
        late = await _late_worker(c, elsewhere)
        try:
            assert await ag.rpc("late", add, (1, 2)) == 3
            assert c.driver._out["late"].kind == "tcp"
        finally:
            await late.shutdown()


async def test_local_sockets_off_means_tcp_only():
    async with ag.local_cluster(0, transport="tcp") as c:
        w = Worker("plain", token=c.driver.token, local_sockets=False)
        await w.start()
        try:
            assert w.local_address == ""
            await w.join(c.address)
            assert await ag.rpc("plain", add, (1, 2)) == 3
            assert c.driver._out["plain"].kind == "tcp"
        finally:
            await w.shutdown()


async def test_the_local_listener_goes_away_with_the_worker():
    async with ag.local_cluster(1, transport="unix") as c:
        name = c.workers[0].local_address
        assert name and transport.local_reachable(name)
        reader, writer = await open_abstract(name)
        writer.close()
    with pytest.raises(ConnectionRefusedError):
        await open_abstract(name)


async def test_unknown_transport_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown transport 'udp'"):
        async with ag.local_cluster(1, transport="udp"):
            pass


async def test_processes_is_a_bool():
    # ("no" started worker processes)
    with pytest.raises(TypeError, match="local_cluster: processes must be a bool"):
        async with ag.local_cluster(1, processes="no"):  # type: ignore[arg-type]
            pass
