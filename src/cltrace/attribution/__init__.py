"""cltrace.attribution"""
