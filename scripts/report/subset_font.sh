#!/bin/sh
# Makes src/report/fonts/DejaVuSans-subset.ttf (13 KB): DejaVu Sans cut down to ASCII plus the few symbols
# plots use (± · × − – — … ° and Greek lower case), unhinted. Needs fontTools (pip install fonttools).
pyftsubset /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
  --unicodes="U+0020-007E,U+00B0,U+00B1,U+00B7,U+00D7,U+2013,U+2014,U+2212,U+2026,U+03B1-03C9" \
  --layout-features='' --no-hinting --output-file=src/report/fonts/DejaVuSans-subset.ttf
