"""The custom-dataset example of docs/data.md runs as written."""

import os
import re

import pytest

from vireid_fast.data import unregister_dataset

from .trees import write_image

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "data.md")


def test_custom_dataset_example(tmp_path, monkeypatch, capsys):
    if not os.path.exists(DOC):
        pytest.skip("docs/data.md not found")
    with open(DOC) as f:
        text = f.read()
    code = re.search(r"<!-- custom-dataset example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    for folder in ("rgb", "ir"):
        for split, pids in (("train", (1, 2, 10)), ("test", (3,))):
            for pid in pids:
                for k in range(2):
                    write_image(str(tmp_path / "my_lab" / folder / split / str(pid) / f"{k}.png"), pid)
    monkeypatch.chdir(tmp_path)
    try:
        namespace = {}
        exec(compile(code, "docs/data.md", "exec"), namespace)
        data = namespace["data"]
        assert data.summary()["train_ids"] == 3 and len(data.train_visible) == 6 and len(data.train_infrared) == 6
        assert {r.modality for r in data.query} == {"infrared"} and len(data.gallery) == 2
        assert "'train_ids': 3" in capsys.readouterr().out
    finally:
        unregister_dataset("my_lab")
