"""Engines: what turns a model into numbers (logits per window, from which perplexity and KL).

``base.Engine`` is the one interface; ``TorchEngine`` runs a (fake-quantized) torch model, the
way the search measures; ``llamacpp.LlamaCppEngine`` runs a GGUF file in llama.cpp, the engine
users deploy with.
"""
