"""Writes the document fixtures of the RAG tests (tests/fixtures/docs) with Python's standard
library only, independently of the Rust readers that parse them:

- comet.pdf: a two-page PDF 1.4 with a text layer (Helvetica, WinAnsi), as a PDF writer lays
  it out: objects, a cross-reference table with byte offsets, a trailer.
- garden.docx: a Word document (Office Open XML) with a title, a heading, paragraphs, a
  bulleted item and a table, as Word stores them (zip of XML parts).

usage: python3 scripts/reference/make_doc_fixtures.py [OUT_DIR]
"""
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/docs")
out.mkdir(parents=True, exist_ok=True)


def pdf(pages):
    objects = []

    def add(body):
        objects.append(body)
        return len(objects)

    catalog = add(None)
    page_tree = add(None)
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    kids = []
    for lines in pages:
        ops = [b"BT", b"/F1 12 Tf", b"14 TL", b"72 720 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(b"(" + escaped.encode("cp1252") + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (page_tree, font, content)))
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % page_tree
    objects[page_tree - 1] = b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % k for k in kids) + b"] /Count %d >>" % len(kids)
    data = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(data))
        data += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        data += b"%010d 00000 n \n" % offset
    data += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref)
    return bytes(data)


(out / "comet.pdf").write_bytes(pdf([
    ["Observatory notes, volume two.", "These pages describe comets seen from the valley."],
    ["The comet Vashti returns every 83 years.", "Its tail glows teal and it was last seen in 1961."],
]))

W = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def paragraph(text, style=None, numbered=False):
    properties = ""
    if style or numbered:
        properties = "<w:pPr>"
        if style:
            properties += f'<w:pStyle w:val="{style}"/>'
        if numbered:
            properties += '<w:numPr><w:ilvl w:val="0"/><w:numId w:val="1"/></w:numPr>'
        properties += "</w:pPr>"
    # Word splits text into runs; a paragraph of two runs checks they are joined.
    half = text.find(" ", len(text) // 2)
    half = len(text) if half < 0 else half
    runs = "".join(f'<w:r><w:t xml:space="preserve">{part}</w:t></w:r>' for part in (text[:half], text[half:]))
    return f"<w:p>{properties}{runs}</w:p>"


body = "".join([
    paragraph("Kestrel Hotel", "Title"),
    paragraph("Garden", "Heading1"),
    paragraph("The rooftop garden of the Kestrel Hotel grows blue tomatoes &amp; silver basil."),
    paragraph("Watering happens at dawn.", numbered=True),
    "<w:tbl><w:tr><w:tc>" + paragraph("Season") + "</w:tc><w:tc>" + paragraph("Harvest") + "</w:tc></w:tr>"
    "<w:tr><w:tc>" + paragraph("Autumn") + "</w:tc><w:tc>" + paragraph("Blue tomatoes") + "</w:tc></w:tr></w:tbl>",
])
document = f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<w:document {W}><w:body>{body}<w:sectPr/></w:body></w:document>'
with zipfile.ZipFile(out / "garden.docx", "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
    archive.writestr("_rels/.rels", '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>')
    archive.writestr("word/document.xml", document)
print(f"wrote {out}/comet.pdf and {out}/garden.docx")
