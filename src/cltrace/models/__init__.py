"""cltrace.models"""
