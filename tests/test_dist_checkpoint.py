"""Checkpointing a DistributedOptimizer: its owners' state gathered, saved to a file,
and loaded into a new one in a new cluster; the resumed run is the uninterrupted one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types

import dist_fns as F
import numpy as np
import pytest
from conftest import assert_no_cycles, replaced_unheard

import actorgrad as ag

XS = np.random.default_rng(3).standard_normal((5, 6, 3))
YS = np.random.default_rng(4).standard_normal((5, 6, 2))
ADAM = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}
ADAMW = {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}


async def _stages(tag: str, states=None) -> list[ag.RRef]:
    """A two-stage model on w1 and w2; its parameters' RRefs, the owners interleaved
    (params[i] is matched by i in a state dict, whoever owns it)."""
    s1, s2 = states or (None, None)
    r1 = await ag.rpc("w1", F.make_stage, (f"{tag}1", 3, 4, 0, s1))
    r2 = await ag.rpc("w2", F.make_stage, (f"{tag}2", 4, 2, 1, s2))
    return [r2[0], r1[0], r1[1], r2[1]]


async def _train(tag: str, opt, steps: slice) -> None:
    for x, y in zip(XS[steps], YS[steps], strict=True):
        async with ag.dist.context() as ctx:
            h = await ag.rpc("w1", F.run_stage, (f"{tag}1", ag.tensor(x), True))
            out = await ag.rpc("w2", F.run_stage, (f"{tag}2", h, False))
            loss = ag.nn.functional.mse_loss(out, ag.tensor(y))
            await ag.dist.backward(ctx, [loss])
            await opt.step(ctx)


async def _weights(tag: str) -> list[dict[str, np.ndarray]]:
    return [await ag.rpc(f"w{i}", F.stage_state, (f"{tag}{i}",)) for i in (1, 2)]


def _save(path, stages: list[dict], opt_state: dict) -> None:
    arrays = {f"model/{i}/{k}": a for i, sd in enumerate(stages) for k, a in sd.items()}
    for i, entry in opt_state["state"].items():
        arrays.update({f"opt/{i}/{k}": np.asarray(v) for k, v in entry.items()})
    arrays["param_groups"] = np.array(json.dumps(opt_state["param_groups"]))
    np.savez(path, **arrays)


def _load(path) -> tuple[list[dict], dict]:
    stages: list[dict] = [{}, {}]
    opt_state: dict = {"state": {}}
    with np.load(path) as f:
        for name in f.files:
            part, *rest = name.split("/")
            if part == "model":
                stages[int(rest[0])][rest[1]] = f[name]
            elif part == "opt":  # (step: a 0-d array, taken as the int it holds)
                opt_state["state"].setdefault(int(rest[0]), {})[rest[1]] = f[name]
            else:
                opt_state["param_groups"] = json.loads(str(f[name]))
    return stages, opt_state


def _local_run(
    cls=ag.optim.Adam, opts=ADAM, lr_at: dict[int, float] | None = None
) -> list[np.ndarray]:
    """The same training in one process with ``cls`` (ag.optim.Adam): the reference
    (``lr_at``: the learning rate set before step i, as ``opt.lr``)."""
    s1 = ag.nn.Linear(3, 4, seed=0, dtype="float64")
    s2 = ag.nn.Linear(4, 2, seed=1, dtype="float64")
    opt = cls([s2.weight, s1.weight, s1.bias, s2.bias], **opts)
    for i, (x, y) in enumerate(zip(XS, YS, strict=True)):
        if lr_at and i in lr_at:
            opt.lr = lr_at[i]
        opt.zero_grad()
        ag.nn.functional.mse_loss(s2(s1(ag.tensor(x)).tanh()), ag.tensor(y)).backward()
        opt.step()
    return [s1.weight.data, s1.bias.data, s2.weight.data, s2.bias.data]


async def test_a_run_resumed_in_a_new_cluster_equals_the_uninterrupted_one(worker_path, tmp_path):
    path = tmp_path / "ckpt.npz"
    async with ag.local_cluster(2, processes=True):
        assert await ag.rpc("w1", F.pid) != os.getpid()
        whole = ag.dist.DistributedOptimizer(ag.optim.Adam, await _stages("a"), **ADAM)
        await _train("a", whole, slice(0, 5))
        expected = await _weights("a")
        opt = ag.dist.DistributedOptimizer(ag.optim.Adam, await _stages("b"), **ADAM)
        await _train("b", opt, slice(0, 2))
        saved = await opt.state_dict()
        assert saved["param_groups"] == [
            {
                **ADAM,
                "weight_decay": 0.0,
                "amsgrad": False,
                "maximize": False,
                "decoupled_weight_decay": False,
                "params": [0, 1, 2, 3],
            }
        ]
        assert sorted(saved["state"]) == [0, 1, 2, 3]
        assert saved["state"][0]["exp_avg"].shape == (2, 4)  # (params[0]: w2's weight)
        assert saved["state"][3]["step"] == 2
        _save(path, await _weights("b"), saved)
        del whole, opt
    stages, opt_state = _load(path)
    async with ag.local_cluster(2, processes=True):  # (new workers: other RRef ids)
        opt = ag.dist.DistributedOptimizer(ag.optim.Adam, await _stages("b", stages), lr=1.0)
        await opt.load_state_dict(opt_state)
        again = await opt.state_dict()
        assert again["param_groups"][0]["lr"] == ADAM["lr"]
        for i, entry in saved["state"].items():
            assert again["state"][i]["step"] == entry["step"]
            assert np.array_equal(again["state"][i]["exp_avg_sq"], entry["exp_avg_sq"])
        await _train("b", opt, slice(2, 5))
        resumed = await _weights("b")
        del opt
    for want, got in zip(expected, resumed, strict=True):
        for k in want:
            assert got[k].dtype == np.float64 and np.array_equal(got[k], want[k]), k
    local = _local_run()
    flat = [resumed[0]["weight"], resumed[0]["bias"], resumed[1]["weight"], resumed[1]["bias"]]
    for a, b in zip(flat, local, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


async def test_the_learning_rate_recipe_changes_it_on_every_owner_keeping_their_state():
    # (docs/porting.md's recipe for torch's param_groups[0]["lr"] = lr: the state dict
    # with another lr, loaded; the run equals a local one whose opt.lr was set there)
    async with ag.local_cluster(2):
        opt = ag.dist.DistributedOptimizer(ag.optim.Adam, await _stages("lr"), **ADAM)
        await _train("lr", opt, slice(0, 2))
        sd = await opt.state_dict()
        sd["param_groups"][0]["lr"] = 0.01
        await opt.load_state_dict(sd)
        await _train("lr", opt, slice(2, 5))
        got = await _weights("lr")
        assert (await opt.state_dict())["param_groups"][0]["lr"] == 0.01
    local = _local_run(lr_at={2: 0.01})
    flat = [got[0]["weight"], got[0]["bias"], got[1]["weight"], got[1]["bias"]]
    for a, b in zip(flat, local, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(local[0], _local_run()[0])  # (the change changed the run)


async def test_a_distributed_adamw_trains_resumes_and_is_refused_by_adam(worker_path):
    # (its options travel to the owners, its state dict is torch's AdamW's, with
    # decoupled_weight_decay True: Adam's refuses it, on the caller, before any owner)
    async with ag.local_cluster(2, processes=True):
        refs = await _stages("w")
        opt = ag.dist.DistributedOptimizer(ag.optim.AdamW, refs, **ADAMW)
        await _train("w", opt, slice(0, 2))
        saved = await opt.state_dict()
        assert saved["param_groups"] == [
            {
                "lr": 0.05,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.1,
                "amsgrad": True,
                "maximize": False,
                "decoupled_weight_decay": True,
                "params": [0, 1, 2, 3],
            }
        ]
        assert sorted(saved["state"][1]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
        adam = ag.dist.DistributedOptimizer(ag.optim.Adam, refs, **ADAM)
        with pytest.raises(ValueError, match="has decoupled_weight_decay True, Adam's is False"):
            await adam.load_state_dict(saved)
        resumed = ag.dist.DistributedOptimizer(
            ag.optim.AdamW, await _stages("v", await _weights("w")), lr=1.0
        )
        await resumed.load_state_dict(saved)
        await _train("w", opt, slice(2, 5))
        await _train("v", resumed, slice(2, 5))
        whole, again = await _weights("w"), await _weights("v")
        del opt, adam, resumed, refs
    for want, got in zip(whole, again, strict=True):
        for k in want:
            assert np.array_equal(got[k], want[k]), k
    local = _local_run(ag.optim.AdamW, ADAMW)
    flat = [whole[0]["weight"], whole[0]["bias"], whole[1]["weight"], whole[1]["bias"]]
    for a, b in zip(flat, local, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


async def _two_owner_sgd():
    refs = await _stages("c")
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)
    await _train("c", opt, slice(0, 1))
    return refs, opt


async def test_a_state_dict_that_does_not_fit_changes_no_owner():
    async with ag.local_cluster(2):
        refs, opt = await _two_owner_sgd()
        before = await opt.state_dict()
        adam = ag.dist.DistributedOptimizer(ag.optim.Adam, refs)
        await _train("c", adam, slice(1, 2))
        with pytest.raises(
            ValueError,
            match=r"SGD takes \['dampening', 'lr', 'maximize', 'momentum', 'nesterov', "
            r"'weight_decay'\]",
        ):
            await opt.load_state_dict(await adam.state_dict())
        fewer = await ag.dist.DistributedOptimizer(ag.optim.SGD, refs[:3], lr=0.1).state_dict()
        with pytest.raises(ValueError, match="the state dict is of 3 parameters, this SGD has 4"):
            await opt.load_state_dict(fewer)
        after = await opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for i, entry in before["state"].items():
            assert np.array_equal(after["state"][i]["momentum_buffer"], entry["momentum_buffer"])
        # a shape only its owner knows: that owner refuses it, and nobody loads
        bad = await opt.state_dict()
        bad["state"][1]["momentum_buffer"] = np.zeros(3)  # (params[1]: w1's weight, (4, 3))
        bad["param_groups"][0]["lr"] = 0.25
        with pytest.raises(
            ag.RemoteError, match=r"state\[1\]\['momentum_buffer'\] has shape"
        ) as ei:
            await opt.load_state_dict(bad)
        assert ei.value.worker == "w1"
        note = "\n".join(getattr(ei.value, "__notes__", []))
        assert (
            "DistributedOptimizer.load_state_dict: failed on 'w1'; nothing loaded; checked on 'w2'"
            in note
        )
        after = await opt.state_dict()  # (w2 loaded nothing either: not its lr, not its state)
        assert after["param_groups"] == before["param_groups"]
        for i, entry in before["state"].items():
            assert np.array_equal(after["state"][i]["momentum_buffer"], entry["momentum_buffer"])


def _squares(ref: ag.RRef) -> ag.Tensor:
    t = ref.local_value()
    return (t * t).sum() + t.sum()


async def test_the_json_recipe_keeps_an_empty_parameter_of_an_owner():
    # (JSON gives back an empty (0, 3) array as []: its owner refused the state,
    # "state[0]['exp_avg'] has shape (0,), its parameter (0, 3)", and nobody loaded)
    async with ag.local_cluster(2):
        refs = [
            await ag.remote("w1", F.make_param, (np.zeros((0, 3)),)),
            await ag.remote("w2", F.make_param, (np.ones(2),)),
        ]
        opt = ag.dist.DistributedOptimizer(ag.optim.Adam, refs, lr=0.1)
        async with ag.dist.context() as ctx:
            parts = [await ag.rpc(r.owner, _squares, (r,)) for r in refs]
            await ag.dist.backward(ctx, [parts[0] + parts[1]])
            await opt.step(ctx)
        saved = await opt.state_dict()
        back = json.loads(json.dumps(saved, default=lambda a: a.tolist()))
        assert back["state"]["0"]["exp_avg"] == []
        back["param_groups"][0]["lr"] = 0.25  # (to see it loaded)
        await opt.load_state_dict(back)
        loaded = await opt.state_dict()
        assert loaded["param_groups"][0]["lr"] == 0.25
        assert loaded["state"][0]["exp_avg"].shape == (0, 3)
        assert np.array_equal(loaded["state"][1]["exp_avg"], saved["state"][1]["exp_avg"])


async def test_a_lost_owner_fails_state_dict_and_load_state_dict_naming_it():
    async with ag.local_cluster(2) as c:
        _, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        await c.workers[1].shutdown(graceful=False)
        with pytest.raises(ag.WorkerLost, match="'w2'") as ei:
            await opt.state_dict()
        note = "\n".join(getattr(ei.value, "__notes__", []))
        assert "DistributedOptimizer.state_dict: no answer from 'w2'; answered on 'w1'" in note
        with pytest.raises(ag.WorkerLost, match="'w2'") as ei:
            await opt.load_state_dict(saved)
        note = "\n".join(getattr(ei.value, "__notes__", []))
        assert "load_state_dict: no answer from 'w2'; nothing loaded; checked on 'w1'" in note


async def test_failed_state_dict_and_load_state_dict_leave_no_reference_cycles(monkeypatch):
    # The error's traceback holds the frames it went through: one that also held the
    # list of the owners' results (the error among them) made a cycle per failure,
    # which kept the owners' optimizer RRefs (and a state dict's arrays) alive until a
    # garbage collection. (In-process workers: one heap for the owners and the caller.)

    from actorgrad.dist import optimizer as dopt

    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        bad = await opt.state_dict()
        bad["state"][1]["momentum_buffer"] = np.zeros(3)

        async def failed_load() -> None:
            with pytest.raises(ag.RemoteError, match="has shape"):
                await opt.load_state_dict(bad)

        async def failed_state_dict() -> None:
            with pytest.raises(ag.RemoteError, match="no state today"):
                await opt.state_dict()

        def refuse(self):
            raise RuntimeError("no state today")

        for failed in (failed_load, failed_state_dict):
            if failed is failed_state_dict:
                monkeypatch.setattr(dopt._LocalOptimizer, "state_dict", refuse)
            await assert_no_cycles(failed, 3)


# --- the load's two rounds: the state crosses once, staged on the owners in between ---


def _sgd_state(refs_shapes: list[tuple[int, ...]], seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "state": {
            i: {"momentum_buffer": rng.standard_normal(s)} for i, s in enumerate(refs_shapes)
        },
        "param_groups": [
            {
                "lr": 0.25,
                "momentum": 0.5,
                "weight_decay": 0.0,
                "dampening": 0.0,
                "nesterov": False,
                "maximize": False,
                "params": [0, 1, 2, 3],
            }
        ],
    }


async def test_a_load_sends_each_owner_its_part_once(monkeypatch):
    # Every frame each worker reads is counted: an owner's part crosses once (the
    # commit is a token), and is kept staged, adopted, until the commit loads it.
    from actorgrad.dist import optimizer as dopt
    from actorgrad.runtime.worker import Worker

    read: dict[str, int] = {}
    on_frame = Worker._on_frame

    def counted(self, conn, buf):
        read[self.name] = read.get(self.name, 0) + len(buf)
        return on_frame(self, conn, buf)

    monkeypatch.setattr(Worker, "_on_frame", counted)  # (before the connections exist)
    at_commit: dict[str, dict[str, int]] = {}
    commit = dopt._LocalOptimizer.commit

    async def observed(self, token, *rest):
        at_commit[ag.worker_name()] = ag.dist.debug_info()
        return await commit(self, token, *rest)

    monkeypatch.setattr(dopt._LocalOptimizer, "commit", observed)
    async with ag.local_cluster(2):
        r1 = await ag.rpc("w1", F.make_stage, ("e1", 300, 200, 0))
        r2 = await ag.rpc("w2", F.make_stage, ("e2", 200, 100, 1))
        refs = [r2[0], r1[0], r1[1], r2[1]]
        opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)
        await opt.state_dict()  # (the owners' optimizers made: their calls not counted)
        state = _sgd_state([(100, 200), (200, 300), (200,), (100,)])
        part = {
            "w1": sum(state["state"][i]["momentum_buffer"].nbytes for i in (1, 2)),
            "w2": sum(state["state"][i]["momentum_buffer"].nbytes for i in (0, 3)),
        }
        assert part == {"w1": 481_600, "w2": 160_800}
        read.clear()
        await opt.load_state_dict(state)
        for owner, nbytes in part.items():
            # (once: the two rounds' other frames, token and replies, are tiny; sent
            # twice it was 2x the part)
            assert nbytes < read[owner] < nbytes + 4096, (owner, read)
            assert at_commit[owner]["num_staged_loads"] == 1, at_commit
            assert at_commit[owner]["staged_load_bytes"] == nbytes, at_commit
            info = await ag.rpc(owner, F.debug_info)
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info
        back = await opt.state_dict()
        assert back["param_groups"] == state["param_groups"]
        for i, entry in state["state"].items():
            assert np.array_equal(back["state"][i]["momentum_buffer"], entry["momentum_buffer"])
        for owner, ref in opt._remote.items():  # (kept as they came, not copied)
            assert await ag.rpc(owner, F.state_memory_owned, (ref,)) == [False], owner
        del opt


async def test_a_refused_load_drops_what_the_other_owners_staged(monkeypatch):
    from actorgrad.dist import optimizer as dopt

    dropped: list[tuple[str, str]] = []
    drop = dopt._Stages.drop

    def noted(self, token, why):
        if token in self.staged:
            dropped.append((self.worker.name, why))
        drop(self, token, why)

    monkeypatch.setattr(dopt._Stages, "drop", noted)
    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        bad = await opt.state_dict()
        bad["state"][1]["momentum_buffer"] = np.zeros(3)  # (w1 refuses, w2 staged)
        with pytest.raises(ag.RemoteError, match="has shape"):
            await opt.load_state_dict(bad)
        assert dropped == [("w2", "it was aborted")]
        for owner in ("w1", "w2"):
            info = await ag.rpc(owner, F.debug_info)
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def test_a_load_cancelled_between_the_rounds_leaves_nothing_staged(monkeypatch):
    # The caller gives up while the commits are out (they never end here): the owners
    # that staged the load are told to drop it, not left holding it until it expires.
    from actorgrad.dist import optimizer as dopt

    committing: asyncio.Queue[str] = asyncio.Queue()
    aborted: asyncio.Queue[str] = asyncio.Queue()
    drop = dopt._Stages.drop

    def noted(self, token, why):
        if token in self.staged and why == "it was aborted":
            aborted.put_nowait(self.worker.name)
        drop(self, token, why)

    async def commit_never(self, token):
        committing.put_nowait(ag.worker_name())
        await asyncio.Event().wait()

    monkeypatch.setattr(dopt._Stages, "drop", noted)
    monkeypatch.setattr(dopt._LocalOptimizer, "commit", commit_never)
    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        load = asyncio.create_task(opt.load_state_dict(saved))
        async with asyncio.timeout(10):
            assert sorted([await committing.get(), await committing.get()]) == ["w1", "w2"]
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        async with asyncio.timeout(10):
            assert sorted([await aborted.get(), await aborted.get()]) == ["w1", "w2"]
        for owner in ("w1", "w2"):
            info = await ag.rpc(owner, F.debug_info)
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


def _part_on(owner: str, opt, saved: dict) -> dict:
    """The part of state dict ``saved`` that ``owner`` loads for ``opt``: its parameters'
    state, under the indexes ``saved`` gives them."""
    where = opt._indices[owner]
    return {
        "state": {i: saved["state"][i] for i in where},
        "param_groups": [{**saved["param_groups"][0], "params": where}],
    }


async def test_a_commit_names_a_token_staged_nowhere_and_why(monkeypatch):
    # The owner's side of the rounds, called as load_state_dict calls it: what a commit
    # finds of a token unknown, aborted, replaced by a later load, committed or expired.
    from actorgrad.dist import optimizer as dopt

    expired = asyncio.get_running_loop().create_future()
    drop = dopt._Stages.drop

    def noted(self, token, why):
        if why.startswith("it expired") and not expired.done():
            expired.set_result(token)
        drop(self, token, why)

    monkeypatch.setattr(dopt._Stages, "drop", noted)
    async with ag.local_cluster(2):
        refs, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        part = _part_on("w1", opt, saved)
        owner = opt._remote["w1"].rpc()

        async def commit_refused(token: int, why: str, through=None) -> None:
            with pytest.raises(ag.RemoteError) as ei:
                await (owner if through is None else through._remote["w1"].rpc()).commit(token)
            assert ei.value.remote_type == "ValueError"
            assert ei.value.remote_message == (
                f"load_state_dict: no state staged under token {token:#x} on worker 'w1' "
                f"to commit: {why}"
            )

        await commit_refused(0x5EED, "no load of that token was staged here")
        await owner.stage(1, "driver", part)
        await owner.abort(1)
        await commit_refused(1, "it was aborted")
        await owner.stage(2, "driver", part)
        await owner.stage(3, "driver", part)  # (the same optimizer: it replaces load 2)
        assert (await ag.rpc("w1", F.debug_info))["num_staged_loads"] == 1
        await commit_refused(2, "a later load (0x3) of the same optimizer replaced it")
        await owner.commit(3)
        await commit_refused(3, "a commit took it already")
        await owner.abort(3)  # (a late abort: the first reason stays)
        await commit_refused(3, "a commit took it already")
        # (a commit reaching another optimizer of the same owner: refused, and the load
        # stays staged for its own)
        other = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1)
        await other.state_dict()  # (its owners' optimizers made)
        await owner.stage(5, "driver", part)
        await commit_refused(5, "it was staged for another optimizer", other)
        await owner.commit(5)
        monkeypatch.setattr(dopt, "STAGE_TIMEOUT", 0.05)
        await owner.stage(4, "driver", part)
        assert await asyncio.wait_for(expired, 10) == 4
        await commit_refused(4, "it expired: no commit came within 0.05 s of its check")
        info = await ag.rpc("w1", F.debug_info)
        assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def test_an_owner_drops_or_refuses_a_load_whose_driver_it_lost():
    # No commit or abort comes from a driver lost to the owner: what it staged goes at
    # the loss, and a part whose driver was lost, or dropped the owner, while the owner
    # checked it is refused, not kept until STAGE_TIMEOUT. (The drivers here are names
    # the owner takes for lost or dropped: no live peer to be heard from again.)
    async with ag.local_cluster(2) as c:
        _, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        part = _part_on("w1", opt, saved)
        w1, owner = c.workers[0], opt._remote["w1"].rpc()

        async def staged_loads() -> int:
            return (await ag.rpc("w1", F.debug_info))["num_staged_loads"]

        await owner.stage(1, "ghost", part)
        assert await staged_loads() == 1
        w1._peer_lost("ghost", cause="its process was stopped")
        assert await staged_loads() == 0
        with pytest.raises(ag.RemoteError) as ei:
            await owner.commit(1)
        assert ei.value.remote_type == "ValueError"
        assert ei.value.remote_message == (
            "load_state_dict: no state staged under token 0x1 on worker 'w1' to commit: "
            "its driver, worker 'ghost', was lost (its process was stopped)"
        )
        w1._peer_lost("quitter", "it heard nothing from this worker", cause="it dropped w1")
        assert w1.dropped_by("quitter") is not None and not w1.is_lost("quitter")
        for token, driver, why in [
            (2, "ghost", "its process was stopped"),
            (3, "quitter", "it dropped w1"),
        ]:
            with pytest.raises(ag.RemoteError) as ei:
                await owner.stage(token, driver, part)
            assert ei.value.remote_type == "actorgrad.errors.WorkerLost"
            assert ei.value.remote_message == (
                f"load_state_dict: load {token:#x}: its driver, worker {driver!r}, was lost "
                f"while worker 'w1' checked it ({why})"
            )
            assert await staged_loads() == 0


async def _load_from_here(refs: list[ag.RRef], state: dict) -> str:
    """(run on a worker) Load ``state`` into a new DistributedOptimizer over ``refs``."""
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)
    try:
        await opt.load_state_dict(state)
    except ag.ActorgradError as exc:
        return f"{exc} {getattr(exc, '__notes__', '')}"
    return "loaded"


async def test_a_load_driven_by_a_new_process_of_a_name_survives_the_word_of_the_old_ones_leave(
    monkeypatch,
):
    # Found by a soak with workers replaced under the same name: an owner drops what a
    # driver staged at the driver's loss, and took that loss by name. A process that
    # joined under the name of one that left can reach an owner before the owner reads
    # the head's word of the leave (its link to the head slower: a host whose link to
    # the head stalls); the leave, read between the load's rounds, dropped the new
    # driver's part, and the load failed on that owner ("its driver, worker 't', was
    # lost (it left the cluster)") after the other owner had loaded.
    from actorgrad.dist import optimizer as dopt

    async with ag.local_cluster(2, transport="tcp") as c:
        head, w1 = c.driver, c.workers[0]
        refs, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        # w1 reads the head's news of "t" late: its leave and the new one's join
        async with replaced_unheard(head, w1, monkeypatch) as (old, new, deliver):
            put = dopt._Stages.put

            def news_once_staged(self, *args, **kwargs):
                put(self, *args, **kwargs)
                if self.worker is w1:  # (the news comes between the rounds)
                    deliver()

            monkeypatch.setattr(dopt._Stages, "put", news_once_staged)
            assert await ag.rpc("t", _load_from_here, (refs, saved)) == "loaded"
            assert w1.left_cluster("t", old.id) and w1.members["t"][0] == new.id
            for owner in ("w1", "w2"):
                info = await ag.rpc(owner, F.debug_info)
                assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def test_an_optimizer_released_with_a_load_staged_for_it_goes_with_it(monkeypatch):
    # The staged state held the owner's optimizer (and its state) alive until the load
    # expired, STAGE_TIMEOUT (300 s) after the optimizer's RRef was released.
    from actorgrad.dist import optimizer as dopt

    released = asyncio.get_running_loop().create_future()
    drop = dopt._Stages.drop

    def noted(self, token, why):
        if why == "its optimizer was released" and not released.done():
            released.set_result((self.worker.name, token, token in self.staged))
        drop(self, token, why)

    monkeypatch.setattr(dopt._Stages, "drop", noted)
    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        part = _part_on("w1", opt, saved)
        await opt._remote["w1"].rpc().stage(7, ag.worker_name(), part)
        assert (await ag.rpc("w1", F.debug_info))["num_staged_loads"] == 1
        del opt
        assert await asyncio.wait_for(released, 10) == ("w1", 7, True)
        info = await ag.rpc("w1", F.debug_info)
        assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


def test_an_optimizer_released_as_its_workers_loop_closes_goes_quietly(monkeypatch):
    # The optimizer of a staged load may go (its RRef released, in any thread) as its
    # worker's loop closes: closed between the check of is_closed() and the call of
    # call_soon_threadsafe, the loop raised RuntimeError in the weakref's callback,
    # printed as "Exception ignored in: <function ... released>". (is_closed says open:
    # the loop closed right after it was asked.)
    from actorgrad.dist import optimizer as dopt

    class Optimizer:  # (what the stages hold of one: weakly, and its stage_token)
        stage_token = None

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    loop = asyncio.SelectorEventLoop()
    stages = dopt._Stages(types.SimpleNamespace(loop=loop))
    optimizer = Optimizer()
    stages.put(7, optimizer, "driver", {}, {})
    loop.close()
    loop.is_closed = lambda: False  # type: ignore[method-assign]
    try:
        del optimizer  # (its weakref's callback runs here)
    finally:
        del loop.is_closed  # (closed, as the loop's collection asks)
    assert unraisable == []


async def test_a_first_round_slower_than_the_owners_keep_their_part_loads_nowhere(monkeypatch):
    # w2 checks its part only once w1's expired: committed, the load was refused on w1
    # (nothing staged) after w2 loaded it. The driver sees the round took too long and
    # aborts it everywhere instead.
    from actorgrad.dist import optimizer as dopt

    expired = asyncio.get_running_loop().create_future()
    drop = dopt._Stages.drop
    stage = dopt._LocalOptimizer.stage

    def noted(self, token, why):
        if why.startswith("it expired") and not expired.done():
            expired.set_result(self.worker.name)
        drop(self, token, why)

    async def late_on_w2(self, token, driver, state):
        if ag.worker_name() == "w2":
            assert await asyncio.wait_for(asyncio.shield(expired), 10) == "w1"
        return await stage(self, token, driver, state)

    monkeypatch.setattr(dopt._Stages, "drop", noted)
    monkeypatch.setattr(dopt._LocalOptimizer, "stage", late_on_w2)
    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        before = await opt.state_dict()
        new = _sgd_state([(2, 4), (4, 3), (4,), (2,)])
        monkeypatch.setattr(dopt, "STAGE_TIMEOUT", 0.2)
        with pytest.raises(TimeoutError) as ei:
            await opt.load_state_dict(new)
        took = str(ei.value).split(" s to check")[0].rpartition(" ")[2]
        assert str(ei.value) == (
            f"load_state_dict: the owners took {took} s to check their parts, past 0.9 x "
            "STAGE_TIMEOUT (0.2 s, how long an owner keeps its part): one that kept its "
            "part early could have dropped it before its commit; nothing loaded (raise "
            "actorgrad.dist.optimizer.STAGE_TIMEOUT on every worker)"
        )
        after = await opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for i, entry in before["state"].items():
            assert np.array_equal(after["state"][i]["momentum_buffer"], entry["momentum_buffer"])
        for owner in ("w1", "w2"):
            info = await ag.rpc(owner, F.debug_info)
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def test_a_commit_fits_the_state_to_a_parameter_changed_since_its_check():
    # Between the rounds a parameter's array can change (user code): the commit casts
    # the staged state to its dtype now, and refuses one of another shape.
    async with ag.local_cluster(2):
        refs, opt = await _two_owner_sgd()
        saved = await opt.state_dict()
        part = _part_on("w1", opt, saved)  # (params[1]: w1's weight, (4, 3) float64)
        owner = opt._remote["w1"].rpc()
        await owner.stage(1, "driver", part)
        await ag.rpc("w1", F.set_weight, ("c1", np.ones((4, 3), np.float32)))
        await owner.commit(1)
        back = (await opt.state_dict())["state"][1]["momentum_buffer"]
        assert back.dtype == np.float32
        assert np.array_equal(back, saved["state"][1]["momentum_buffer"].astype(np.float32))
        # (the weight's state cast: the bias's copied too, not kept as it came, a view
        # into the message that holds the weight's bytes before the cast)
        assert await ag.rpc("w1", F.state_memory_owned, (opt._remote["w1"],)) == [True]
        await owner.stage(2, "driver", part)
        await ag.rpc("w1", F.set_weight, ("c1", np.ones((5, 3))))
        with pytest.raises(ag.RemoteError) as ei:
            await owner.commit(2)
        assert ei.value.remote_type == "ValueError"
        assert ei.value.remote_message == (
            "load_state_dict: state[1]['momentum_buffer'] has shape (4, 3), its parameter (5, 3)"
        )
        assert (await opt.state_dict())["state"][1]["momentum_buffer"].dtype == np.float32


@pytest.mark.timeout(60)
async def test_a_driver_lost_between_the_rounds_leaves_nothing_staged(worker_path):
    # w3 drives the load and dies once both owners staged their part: no commit or
    # abort comes, and each owner drops what it staged at w3's loss.
    async with ag.local_cluster(3, processes=True):
        refs = await _stages("f")
        state = _sgd_state([(2, 4), (4, 3), (4,), (2,)])
        with pytest.raises(ag.WorkerLost, match="'w3'"):
            await ag.rpc("w3", F.load_and_die_before_commit, (refs, state, "driver"))
        staged = F.get("staged")
        for owner in ("w1", "w2"):
            assert staged[owner]["num_staged_loads"] == 1, staged
            assert staged[owner]["staged_load_bytes"] > 0, staged
            info = await ag.rpc(owner, F.staged_after_loss_of, ("w3", 20.0))
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def test_two_loads_of_one_optimizer_at_once_load_one_after_the_other(monkeypatch):
    # An owner keeps one staged load per optimizer: both first rounds went out before
    # either's second, the later stage replaced the earlier one, whose commit then
    # failed (in about half the runs: when the later check ended before the earlier
    # commit came), or, the checks running in the pool, each load was committed on some
    # owners. Now the second load starts once the first ended: both load, the second last.
    from actorgrad.dist import optimizer as dopt

    seen: dict[str, list[tuple[str, int]]] = {"w1": [], "w2": []}
    stage, commit = dopt._LocalOptimizer.stage, dopt._LocalOptimizer.commit

    async def staged(self, token, *rest):
        seen[ag.worker_name()].append(("stage", token))
        return await stage(self, token, *rest)

    async def committed(self, token):
        seen[ag.worker_name()].append(("commit", token))
        return await commit(self, token)

    monkeypatch.setattr(dopt._LocalOptimizer, "stage", staged)
    monkeypatch.setattr(dopt._LocalOptimizer, "commit", committed)
    async with ag.local_cluster(2):
        _, opt = await _two_owner_sgd()
        saved = await opt.state_dict()

        def scaled(k: float) -> dict:
            return {
                "state": {
                    i: {"momentum_buffer": e["momentum_buffer"] * k}
                    for i, e in saved["state"].items()
                },
                "param_groups": [{**saved["param_groups"][0], "lr": 0.1 * k}],
            }

        first, second = scaled(2.0), scaled(3.0)
        async with asyncio.timeout(20):
            await asyncio.gather(opt.load_state_dict(first), opt.load_state_dict(second))
        for owner, calls in seen.items():
            assert [c for c, _ in calls] == ["stage", "commit", "stage", "commit"], (owner, calls)
            assert calls[0][1] == calls[1][1] != calls[2][1] == calls[3][1], (owner, calls)
        back = await opt.state_dict()
        assert back["param_groups"] == second["param_groups"]
        for i, entry in second["state"].items():
            assert np.array_equal(back["state"][i]["momentum_buffer"], entry["momentum_buffer"])
        for owner in ("w1", "w2"):
            info = await ag.rpc(owner, F.debug_info)
            assert (info["num_staged_loads"], info["staged_load_bytes"]) == (0, 0), info


async def _step_ones(opt, ref) -> None:
    """A step of ``opt`` with a gradient of ones for ``ref``'s parameter."""
    async with ag.dist.context() as ctx:
        w = await ref.to_here()
        await ag.dist.backward(ctx, [w.sum()])
        await opt.step(ctx)


async def test_a_step_that_reached_an_owner_during_a_load_is_not_taken_as_loaded(monkeypatch):
    # A load's end took every owner for having the state dict's hyperparameters. A step
    # of the same optimizer that reached an owner after its commit, with the values
    # param_groups held then (lr 0.1), left that owner with those: param_groups showed
    # the loaded lr (0.5), the next steps sent nothing, and the owner stepped with 0.1
    # for good, as nothing said. (As two steps at once: which set the values last is not
    # known, so the next step sends them all.)
    from actorgrad.dist import optimizer as dopt

    committed, go = asyncio.Event(), asyncio.Event()
    commit = dopt._LocalOptimizer.commit

    async def held(self, token):
        await commit(self, token)
        committed.set()
        await go.wait()

    monkeypatch.setattr(dopt._LocalOptimizer, "commit", held)
    async with ag.local_cluster(1):
        ref = await ag.remote("w1", F.make_param, (np.zeros(2),))
        opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [ref], lr=0.5)
        saved = await opt.state_dict()
        opt.param_groups[0]["lr"] = 0.1
        async with asyncio.timeout(20):
            load = asyncio.create_task(opt.load_state_dict(saved))
            await committed.wait()
            await _step_ones(opt, ref)  # (after the commit on w1: lr 0.1 there)
            go.set()
            await load
            assert opt.param_groups[0]["lr"] == 0.5
            np.testing.assert_allclose((await ref.to_here()).data, [-0.1, -0.1])
            await _step_ones(opt, ref)  # (with the loaded lr, as param_groups says)
            np.testing.assert_allclose((await ref.to_here()).data, [-0.6, -0.6])
            assert (await opt.state_dict())["param_groups"][0]["lr"] == 0.5
