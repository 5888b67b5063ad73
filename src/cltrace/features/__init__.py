"""cltrace.features"""
