"""moa-local: Mixture-of-Agents on local hardware.

    import moa_local
    with moa_local.load("tiny") as moa:
        print(moa.run(["Why is the sky blue?"])[0].output)
"""

from moa_local.api import MoA, load
from moa_local.errors import MoaError
from moa_local.pipeline import Conversation, Result

__version__ = "0.1.0"
__all__ = ["Conversation", "MoA", "MoaError", "Result", "__version__", "load"]
