import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors and models: intra-op threads only add synchronisation (several times slower on
    a busy machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
