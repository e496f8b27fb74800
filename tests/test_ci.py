"""CI's pins: every dependency the test command installs is pinned, torch's build is not.

``.ci/run`` runs the README's test command verbatim, and that command installs with ``-c .ci/constraints.txt``.
A requirement of ``setup.py`` missing from the constraints would float to the newest release on a new machine,
which is how a transformers release once turned CI red without a commit. torch, triton and what only torch needs
must stay out of it: a CUDA build of torch pins its own triton, and a pin here would make the README's command
fail for its users.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_OWN = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonical(m.group(1))
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = m.group(2)
    return out


def setup_requirements() -> list[str]:
    """Names in setup.py's install_requires and its dev extra (the README's test command installs both)."""
    text = (ROOT / "setup.py").read_text()
    names = []
    for block in (
        re.search(r"^DALI = \[(.*?)^\]", text, re.S | re.M).group(1),
        re.search(r"^DEV = \[(.*?)^\]", text, re.S | re.M).group(1),
        re.search(r"install_requires=\[(.*?)\]", text, re.S).group(1),
    ):
        names += re.findall(r'^\s*"([A-Za-z0-9._-]+)', block, re.M)
    return [canonical(n) for n in names]


def test_readme_test_command_installs_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    cmd = next(line for line in readme.splitlines() if line.startswith('pip install -e ".[dev]"') and "pytest" in line)
    assert "-c .ci/constraints.txt" in cmd


def test_every_requirement_is_pinned_except_torchs_own():
    pinned = pins(ROOT / ".ci" / "constraints.txt")
    required = setup_requirements()
    assert {"transformers", "pytest", "ruff", "numpy"} <= set(required)  # the parse found the lists
    missing = [n for n in required if n not in pinned and n not in TORCH_OWN]
    assert missing == [], f"requirements CI would install at their newest release: {missing}"
    wrongly_pinned = TORCH_OWN & set(pinned)
    assert not wrongly_pinned, f"pinned in constraints.txt, but the installed torch build decides: {wrongly_pinned}"


def test_ci_torch_is_the_pinned_cpu_build():
    torch_pins = pins(ROOT / ".ci" / "torch-cpu.txt")
    assert torch_pins["torch"] == "2.13.0" and "triton" in torch_pins
    assert set(torch_pins) <= TORCH_OWN
    assert "-r .ci/torch-cpu.txt" in (ROOT / ".ci" / "run").read_text()
