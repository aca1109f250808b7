"""DLG: Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its successors."""
