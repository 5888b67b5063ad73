"""cltrace.data"""
