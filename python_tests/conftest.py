import pytest
import torch

import quantkernels


@pytest.fixture(params=quantkernels.supported_isas())
def isa(request):
    """Runs a test once per instruction set this CPU supports, restoring the active one afterwards."""
    before = quantkernels.active_isa()
    quantkernels.set_isa(request.param)
    yield request.param
    quantkernels.set_isa(before)


@pytest.fixture
def rng():
    """Fresh random inputs on every run; the seed is printed on failure so a run can be replayed."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)
