"""cltrace.transcoders"""
