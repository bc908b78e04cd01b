"""fedsea: split serving and fine-tuning of LLaMA-family models (FedSEA-LLaMA).

This package is the launcher (`fedsea` console script).  The runtimes live in
edge_runtime/, server_runtime/, gateway/ and training/; what they share is in
fedsea_shared/.
"""
