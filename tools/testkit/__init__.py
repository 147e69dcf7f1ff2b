"""Code the tests and the tools share (not shipped): the model zoos and one zoo entry's run through the
pipeline (:mod:`.zoos`, :mod:`.zoo_run`, :mod:`.torchvision_zoo`), the fuzzer's random programs and checks
(:mod:`.fuzz_programs`, :mod:`.fuzz_model`, :mod:`.fuzz_check`) and the attention cost measurement
(:mod:`.attention_costs`).

Importable as ``testkit`` by the scripts in ``tools/`` (their own folder is on the path) and by the tests
(``pythonpath = ["tools"]`` in pyproject.toml's pytest options).
"""
