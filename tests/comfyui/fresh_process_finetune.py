"""Run a SINE Finetune workflow in a NEW ComfyUI process on an existing test folder; print JSON: did it train?

Used by test_finetune.py to prove the disk cache survives a ComfyUI restart.
"""
import json
import sys
from pathlib import Path

from comfyui_harness import ComfySession, find_comfyui

work, graph = Path(sys.argv[1]), json.loads(sys.argv[2])
session = ComfySession(find_comfyui(), work)
session.run(graph)
steps = graph["finetune"]["inputs"]["steps"]
print(json.dumps({"training_steps": len([v for v, total, _ in session.progress if total == steps])}))
