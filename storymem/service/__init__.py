"""The service core, without Ray: the contract, request intake, the job book and the facade.

    contract.py  states, status, page, the error family and the engine's method list
    intake.py    request normalisation and validation (once, at the edge), limits, reference images
    book.py      the job book: queue, tenants' turns, states, event logs, retry-after, rebuild
    facade.py    StoryService: what the HTTP routes, the batch job and the in-cluster client call

The Ray layer (`actors/`) adds placement and supervision: its engine is a JobBook over directors.
Only the contract is imported here, so that the library (`storymem.story`) can use the state enum.
"""

from .contract import *  # noqa: F401,F403
from .contract import __all__  # noqa: F401
