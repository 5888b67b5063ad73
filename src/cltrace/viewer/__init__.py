"""cltrace.viewer"""
