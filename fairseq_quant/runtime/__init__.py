"""On-device runtime: decodes an exported ``.fqm`` model with ONNX Runtime. Imports neither torch nor fairseq."""
