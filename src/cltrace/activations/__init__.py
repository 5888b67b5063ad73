"""cltrace.activations"""
