"""The terminal of a CLI run: uniner's own lines stay, everything else goes to files that the run names."""

import os
import subprocess
import sys

import pytest

from uniner.session import OWN_LINE


@pytest.mark.parametrize(
    "line, own",
    [
        ("uniner train: step 1/8 epoch 0.06 loss 3.55", True),
        ("14:00:01 uniner.extract: extract: 60 documents", True),
        ("(EngineCore pid=7) INFO 12-02 [core.py:90] Initializing a V1 LLM engine", False),
        ("KeyError: '/psm_9bce9c28'", False),
        ("[2026-12-02 13:12:49,718 E 4360 4360] core_worker.cc:2465: Actor with class name", False),
        ("Loading weights: 100%|██████████| 272/272 uniner", False),
    ],
)
def test_own_lines_are_told_from_the_rest(line, own):
    assert bool(OWN_LINE.match(line)) == own


def test_diverted_stderr_goes_to_a_file_and_own_lines_to_the_terminal(tmp_path):
    script = (
        "import os, sys\n"
        "from uniner import session\n"
        "with session.quiet_terminal() as terminal:\n"
        "    session._divert_stderr()\n"
        "    os.write(2, b'core_worker.cc: a C++ line\\n')\n"
        "    print('a library warning', file=sys.stderr)\n"
        "    print('uniner: our line', file=session.terminal())\n"
        "print(session.diverted()['stderr'])\n"
        "print('after the block', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["uniner: our line", "after the block"]
    diverted = open(result.stdout.strip()).read()
    assert "core_worker.cc: a C++ line" in diverted and "a library warning" in diverted


def test_embedded_ray_workers_import_the_drivers_uniner(ray_session):
    """Workers put this uniner first on their path, so a checkout run without installing works: a worker that could
    not import uniner would fail its setup hook, and Ray retries such tasks without end."""
    import ray

    import uniner

    @ray.remote
    def where() -> tuple[str, str]:
        import uniner

        return uniner.__file__, os.environ["PYTHONPATH"]

    path, python_path = ray.get(where.remote())
    assert path == uniner.__file__
    assert python_path.split(os.pathsep)[0] == os.path.dirname(os.path.dirname(uniner.__file__))
