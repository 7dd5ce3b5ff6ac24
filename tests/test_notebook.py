"""The teaching notebook is stored without outputs and runs end to end, offline, on a random
checkpoint: executed here in a Jupyter kernel, so it cannot rot."""

import time

import nbformat
from nbclient import NotebookClient

from helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "llm_as_embedder.ipynb"


def test_the_notebook_is_stored_without_outputs_and_runs_end_to_end():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    t0 = time.time()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    print(f"notebook executed in {time.time() - t0:.1f}s")
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # the grid, what EOS reads, the residual stream, the similarities, the curves
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
