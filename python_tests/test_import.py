import subprocess
import sys


def test_imports_without_triton_or_gpu():
    """A CPU-only user without Triton: blocking the module must not break `import quantkernels`."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import quantkernels, torch\n"
        "assert 'quantkernels.triton.register' not in sys.modules\n"
        "print(quantkernels.active_isa())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
