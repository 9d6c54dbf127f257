"""README.md's node reference matches the live node definitions (regenerate: python tests/readme_reference.py)."""
from readme_reference import README, pack_node_ids, render


def test_readme_node_reference_is_current(comfy):
    block = render(comfy.nodes, pack_node_ids(comfy.nodes))
    assert block in README.read_text(), "README node reference is stale: run `python tests/readme_reference.py`"
