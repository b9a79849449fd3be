"""What a model artifact holds and runs at inference: the fusion ranker (:mod:`~rerank.model.ranker`), its inputs
(:mod:`~rerank.model.inputs`), the text-image alignment and the colour head (:mod:`~rerank.model.alignment`,
:mod:`~rerank.model.colour`), the artifact on disk (:mod:`~rerank.model.artifact`), the ONNX runtime path
(:mod:`~rerank.model.onnx_ranker`) and GPU micro-batching (:mod:`~rerank.model.batching`).

Nothing is imported here: replaying saved features on a bare GPU box needs only numpy, torch and safetensors.
"""
