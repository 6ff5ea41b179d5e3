"""purelens: look inside neural networks and change what happens there, purely.

Interventions are immutable pytrees; `run` interleaves them with any
`torch.nn.Module`'s forward pass and returns a `Record`. Nothing is mutable,
so experiments compose with `torch.func.grad`, `vmap` and `jacrev`.

Examples:
    >>> import torch, purelens as pl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> rec = pl.run(model, torch.randn(3, 4), [pl.save("1"), pl.add("0", torch.ones(8))])
    >>> rec["1"].shape
    torch.Size([3, 8])
"""

from . import diffusion as diffusion
from . import functions as functions
from . import models as models
from . import ops as ops
from . import vllm as vllm
from ._builders import ablate as ablate
from ._builders import add as add
from ._builders import patch as patch
from ._builders import replace as replace
from ._builders import save as save
from ._builders import scale as scale
from ._builders import skip as skip
from ._builders import stop as stop
from ._builders import transplant as transplant
from ._compile import compile as compile
from ._edit import edit as edit
from ._errors import PurelensError as PurelensError
from ._errors import SiteError as SiteError
from ._generate import generate as generate
from ._grads import patch_grad as patch_grad
from ._grads import save_grad as save_grad
from ._heads import head as head
from ._inputs import tokenize as tokenize
from ._interventions import Intervention as Intervention
from ._listing import sites as sites
from ._positions import at as at
from ._positions import last_token as last_token
from ._positions import token_index as token_index
from ._record import Record as Record
from ._remote import RemoteError as RemoteError
from ._remote import remote as remote
from ._run import run as run
from ._serialize import dumps as dumps
from ._serialize import loads as loads
from ._shapes import Shapes as Shapes
from ._shapes import shapes as shapes
from ._sweep import sweep as sweep

__version__ = "0.1.0"

__all__ = [
    "Intervention",
    "PurelensError",
    "Record",
    "RemoteError",
    "Shapes",
    "SiteError",
    "ablate",
    "add",
    "at",
    "compile",
    "dumps",
    "edit",
    "functions",
    "generate",
    "head",
    "last_token",
    "loads",
    "models",
    "ops",
    "patch",
    "patch_grad",
    "remote",
    "replace",
    "run",
    "save",
    "save_grad",
    "scale",
    "shapes",
    "sites",
    "skip",
    "stop",
    "sweep",
    "token_index",
    "tokenize",
    "transplant",
    "vllm",
]
