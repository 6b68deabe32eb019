"""examples/quickstart.ipynb runs top to bottom (so it cannot rot)."""

import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_quickstart_notebook_executes_and_prints_the_plan() -> None:
    path = os.path.join(REPO, "examples", "quickstart.ipynb")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
    ).execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "t_cat_0" in outputs and "rank 1 (cpu)" in outputs  # the plan and memory per device
    assert "torch.Size([512, 1])" in outputs
    assert any(
        "image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )
