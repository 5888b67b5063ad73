"""cltrace.interventions"""
