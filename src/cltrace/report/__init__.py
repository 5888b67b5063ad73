"""Reports: Markdown with inline-free SVG figures, written without plotting dependencies."""
