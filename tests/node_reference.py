"""The node reference (docs/nodes.md), rendered from the LIVE node definitions ComfyUI serves to its frontend.

    python tests/node_reference.py          # rewrite the block between the markers in docs/nodes.md
tests/comfyui/test_node_reference.py fails when the block in docs/nodes.md differs from what this renders.
"""
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "nodes.md"
BEGIN, END = "<!-- node-reference:begin -->", "<!-- node-reference:end -->"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(opts: dict) -> str:
    if "default" not in opts:
        return ""
    value = opts["default"]
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def render(nodes_module, node_ids: list[str]) -> str:
    """Markdown for every node: description, inputs (type, default, tooltip) and outputs."""
    out = [BEGIN]
    for node_id in node_ids:
        info = nodes_module.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        out += [f"#### {info['display_name']} (`{node_id}`)", "", info["description"], "",
                "| Input | Type | Default | What it does |", "|---|---|---|---|"]
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                kind, opts = info["input"][section][name][0], info["input"][section][name][1]
                kind = "COMBO" if isinstance(kind, list) else kind
                label = f"{name}{' (optional)' if section == 'optional' else ''}"
                out.append(f"| {label} | {kind} | {_default(opts)} | {_cell(opts.get('tooltip', ''))} |")
        outputs = ", ".join(f"{n} ({t}){': ' + tip if tip else ''}" for n, t, tip in
                            zip(info["output_name"], info["output"], info.get("output_tooltips") or [None] * 99))
        out += ["", f"Outputs: {outputs or 'none (output node)'}", ""]
    out.append(END)
    return "\n".join(out)


def replace_block(text: str, block: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[end:]


def pack_node_ids(nodes_module) -> list[str]:
    """The pack's nodes in the order it registers them."""
    return [k for k in nodes_module.NODE_CLASS_MAPPINGS if k.startswith("SINE_")]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tempfile
    from comfyui_harness import ComfySession, find_comfyui
    session = ComfySession(find_comfyui(), Path(tempfile.mkdtemp()))
    REFERENCE.write_text(replace_block(REFERENCE.read_text(), render(session.nodes, pack_node_ids(session.nodes))))
    print(f"updated {REFERENCE}")
