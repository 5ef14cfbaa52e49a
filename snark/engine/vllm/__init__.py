"""vLLM as Snark's second engine (``engine.VllmEngine``), imported only when it is chosen.

``args`` and ``sampling`` map Snark's settings and sampling parameters to vLLM's without importing
vLLM; ``runtime`` is the one module that imports it; ``prompt`` builds vLLM's inputs from Snark's
prompts. Import ``snark.engine.vllm.engine`` for the engine itself.
"""
