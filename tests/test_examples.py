"""Each example runs briefly, as a user would run it, and reaches what it promises."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(*args: str, timeout: float = 90, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    env.update(extra)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_the_examples_use_only_the_public_api():
    # (an example is what a user copies: the pipeline's imported its model and training
    # loop from actorgrad.demo, and both took their --steps type from actorgrad.cli,
    # neither of them the public API)
    import ast

    import actorgrad as ag

    public = {"actorgrad": ag.__all__}
    for name in ("nn", "dist", "optim", "nn.functional"):
        module = ag
        for part in name.split("."):
            module = getattr(module, part)
        public[f"actorgrad.{name}"] = getattr(
            module, "__all__", [n for n in dir(module) if n[0] != "_"]
        )
    for script in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(script.read_text())
        aliases = {}  # (a name bound to a public module: its attributes are checked)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.partition(".")[0] == "actorgrad":
                        assert a.name in public, (script.name, a.name)
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("actorgrad"):
                assert node.module in public, (script.name, node.module)
                for a in node.names:
                    assert a.name in public[node.module], (script.name, node.module, a.name)
                    full = f"{node.module}.{a.name}"
                    if full in public:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):  # (ag.nn.Linear, F.cross_entropy: each step public)
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in aliases and chain:
                module = aliases[node.id]
                for attr in reversed(chain):
                    assert attr in public[module], (script.name, module, attr)
                    if f"{module}.{attr}" not in public:
                        break
                    module = f"{module}.{attr}"


def test_the_pipeline_example_trains_as_the_demo_does():
    # (the example has its own copy of the demo's model and loop, as a user would: the
    # same numbers, step by step; the rates aside)
    def steps(p: subprocess.CompletedProcess[str]) -> list[str]:
        assert p.returncode == 1, p.stdout + p.stderr  # (0.99: not reached in 50 steps)
        lines = [re.sub(r"[0-9.]+ s(teps/s)?\b", "", line) for line in p.stdout.splitlines()]
        return [line for line in lines if line.startswith(("pipeline:", "step", "done:", "target"))]

    argv = ["--steps", "50", "--target", "0.99"]
    demo = run("-m", "actorgrad", "demo", "--in-process", *argv)
    example = run(str(EXAMPLES / "pipeline_parallel.py"), *argv)
    assert len(steps(demo)) == 5 and steps(example) == steps(demo), (example.stdout, demo.stdout)


def test_quickstart_prints_the_right_gradients():
    p = run(str(EXAMPLES / "quickstart.py"))
    assert p.returncode == 0, p.stderr
    x, w = np.array([1.0, 2.0, 3.0]), np.array([0.5, -0.5, 0.25])
    d = 1 - np.tanh(x * w) ** 2
    found = {m[0]: m[1] for m in re.findall(r"dloss/d(\w) +\[([^\]]*)\]", p.stdout)}
    np.testing.assert_allclose(np.array(found["x"].split(), float), (d * w).round(4), atol=1e-4)
    np.testing.assert_allclose(np.array(found["w"].split(), float), (d * x).round(4), atol=1e-4)


def test_readme_quickstart_is_the_example_and_shows_its_output():
    """The README's quickstart block is examples/quickstart.py (without its docstring),
    and the output it shows is what that prints."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    example = (EXAMPLES / "quickstart.py").read_text()
    assert example.endswith(code) and example[: -len(code)].strip().startswith('"""')
    p = run(str(EXAMPLES / "quickstart.py"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == shown, (p.stdout, shown)


def test_parameter_server_trains_to_accuracy():
    p = run(str(EXAMPLES / "parameter_server.py"), "--steps", "40")
    assert p.returncode == 0, p.stdout + p.stderr
    acc = float(re.search(r"test accuracy ([0-9.]+)", p.stdout).group(1))
    assert acc >= 0.9


def test_pipeline_parallel_under_actorgrad_run():
    p = run(
        "-m",
        "actorgrad",
        "run",
        "-n",
        "3",
        str(EXAMPLES / "pipeline_parallel.py"),
        "--steps",
        "300",
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "target test accuracy 0.95: reached" in p.stdout
    assert re.search(r"[0-9.]+ steps/s", p.stdout)


def test_pipeline_parallel_on_too_few_workers_says_so():
    # (a traceback from deep in the demo's code, before)
    p = run("-m", "actorgrad", "run", "-n", "2", str(EXAMPLES / "pipeline_parallel.py"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "the pipeline needs 3 workers, the cluster has 2" in p.stderr
    assert "Traceback" not in p.stderr


def test_parameter_server_on_one_worker_says_it_has_no_trainer():
    # (it "trained" with no trainer: test accuracy 0.231, exit 1 and no word why)
    p = run("-m", "actorgrad", "run", "-n", "1", str(EXAMPLES / "parameter_server.py"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "a parameter server needs at least one trainer: the cluster has 1" in p.stderr
    assert "Traceback" not in p.stderr


def test_the_examples_take_a_blank_cluster_address_for_none():
    # (ACTORGRAD_ADDRESS=" ", as `ACTORGRAD_ADDRESS="$ADDR "` with ADDR unset gives: they
    # called ag.init("driver"), which takes a blank address for none and started a
    # cluster of its own, without workers: "the pipeline needs 3 workers, the cluster
    # has 0", and the parameter server's IndexError traceback)
    p = run(str(EXAMPLES / "parameter_server.py"), "--steps", "40", ACTORGRAD_ADDRESS=" ")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"server w1: test accuracy 0\.9\d+ after 40 steps", p.stdout), p.stdout
    p = run(
        str(EXAMPLES / "pipeline_parallel.py"), "--steps", "25", "--target", "0.5",
        ACTORGRAD_ADDRESS=" ",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pipeline: w1 -> w2 -> w3" in p.stdout and "0.50: reached" in p.stdout, p.stdout


def test_an_example_joining_a_cluster_whose_driver_name_is_taken_says_so(tmp_path):
    # (`actorgrad cluster` says to export its address; two examples run at once on it,
    # both joined as "driver": the second died in a ValueError traceback; with no token
    # exported, the same)
    from clitools import Running

    token = tmp_path / "token"
    cluster = Running("cluster", "-n", "3", "--token-file", str(token))
    driver = None
    try:
        address = cluster.expect("address:")
        driver = Running(
            "worker", "--join", address, "--name", "driver", "--token-file", str(token)
        )
        driver.expect("worker driver joined")
        for script in ("parameter_server.py", "pipeline_parallel.py"):
            p = run(
                str(EXAMPLES / script), "--steps", "3",
                ACTORGRAD_ADDRESS=address, ACTORGRAD_TOKEN=token.read_text().strip(),
            )  # fmt: skip
            assert p.returncode == 1, (script, p.stdout, p.stderr)
            # (naming the holder: its cluster id and address)
            assert re.fullmatch(
                re.escape(
                    f"error: cannot join the cluster at {address}: a worker named 'driver' is "
                    "already in the cluster (cluster id "
                )
                + r"\d+, at 127\.0\.0\.1:\d+\)\n",
                p.stderr,
            ), (script, p.stderr)
        p = run(str(EXAMPLES / "pipeline_parallel.py"), ACTORGRAD_ADDRESS=address)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr == (
            f"error: cannot join the cluster at {address}: joining a cluster needs its "
            "token: pass token=... or set ACTORGRAD_TOKEN\n"
        ), p.stderr
    finally:
        if driver is not None:
            driver.stop()
        cluster.stop()


def test_the_examples_check_their_arguments():
    # (--steps 0 "trained" to a test accuracy of 0.000, --target 2 or nan was taken)
    for script, argv, message in [
        ("pipeline_parallel.py", ["--steps", "0"], "--steps: must be at least 1: 0"),
        ("pipeline_parallel.py", ["--target", "nan"], "a test accuracy is in [0, 1]: nan"),
        ("pipeline_parallel.py", ["--target", "2"], "a test accuracy is in [0, 1]: 2.0"),
        ("parameter_server.py", ["--steps", "-1"], "--steps: must be at least 1: -1"),
    ]:
        p = run(str(EXAMPLES / script), *argv, timeout=30)
        assert p.returncode == 2 and message in p.stderr, (script, argv, p.stderr)


def test_demo_in_process():
    # (with a cluster's address exported, as `cluster` says to: local_cluster warned the
    # user to change the demo's code, `await ag.init(name)` instead)
    p = run(
        "-m", "actorgrad", "demo", "--in-process", "--steps", "300",
        ACTORGRAD_ADDRESS="127.0.0.1:9",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reached" in p.stdout
    assert "demo: ACTORGRAD_ADDRESS (127.0.0.1:9) is not used" in p.stdout
    assert "WARNING" not in p.stderr, p.stderr


def test_the_examples_whose_stdout_reader_went_away_stop_quietly():
    # (`python examples/parameter_server.py | head -1`, and the pipeline's, under
    # `actorgrad run` too: a BrokenPipeError's traceback, exit status 1; the demo, the
    # same training, stopped quietly with 141 as a command killed by SIGPIPE does. Its
    # stdout unbuffered, a print failed; block-buffered, as a user's shell has it, the
    # flush at the exit did: "Exception ignored in: <_io.TextIOWrapper name='<stdout>'
    # ...> BrokenPipeError", exit status 120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    buffered = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    pipeline = str(EXAMPLES / "pipeline_parallel.py")
    for argv, environ in [
        (argv, environ)
        for environ in ({**buffered, "PYTHONUNBUFFERED": "1"}, buffered)
        for argv in [
            [str(EXAMPLES / "parameter_server.py"), "--steps", "3"],
            [pipeline, "--steps", "25"],
            [*"-m actorgrad run -n 3".split(), pipeline, "--steps", "25"],
        ]
    ]:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environ,
        )
        try:
            assert proc.stdout is not None
            proc.stdout.close()  # (the reader is gone before the first line)
            _, err = proc.communicate(timeout=90)
            unbuffered = "PYTHONUNBUFFERED" in environ
            assert proc.returncode == 141, (argv, unbuffered, proc.returncode, err)
            assert err == "", (argv, unbuffered, err)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_the_examples_run_with_stdout_closed():
    # (`python examples/pipeline_parallel.py >&-`: sys.stdout is None, and what they
    # print goes nowhere; their status is still the training's)
    for argv in (
        [str(EXAMPLES / "parameter_server.py"), "--steps", "40"],
        [str(EXAMPLES / "pipeline_parallel.py"), "--steps", "25", "--target", "0.5"],
    ):
        p = subprocess.run(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")},
            timeout=90,
            pass_fds=(),
            preexec_fn=lambda: os.close(1),
        )
        assert (p.returncode, p.stderr) == (0, ""), argv
