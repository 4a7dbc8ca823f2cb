// Reads files with Bio-Formats, the reader inside QuPath and OMERO, for the export tests: one JVM for
// many files, because each JVM start costs 1-2 s.
//
//     java -cp bioformats_package.jar BioFormatsRead.java OUT_DIR FILE...
//
// Per file, one JSON line in OUT_DIR/read.jsonl (stdout carries Bio-Formats' log): whether the OME-XML
// stored in the file validates against the OME schema Bio-Formats bundles (XMLTools, as XMLValidate does),
// whether the OME-XML Bio-Formats makes of the file validates (what `ImageInfo -omexml -validate` checks),
// and every series with its name and resolutions. Resolutions are not flattened into series (QuPath's
// view: a pyramid is one image). The pixels of resolution r of series s of file f go to OUT_DIR/f_s_r.raw
// exactly as Bio-Formats' openBytes returns them.
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.lang.reflect.Field;

import loci.common.DebugTools;
import loci.common.xml.XMLTools;
import loci.common.services.ServiceFactory;
import loci.formats.ImageReader;
import loci.formats.meta.IMetadata;
import loci.formats.services.OMEXMLService;
import loci.formats.services.OMEXMLServiceImpl;
import loci.formats.tiff.TiffParser;

public class BioFormatsRead {
    public static void main(String[] args) throws Exception {
        DebugTools.setRootLevel("ERROR");
        OMEXMLService service = new ServiceFactory().getInstance(OMEXMLService.class);
        // The schema as Bio-Formats bundles it: XMLValidate's XMLTools.validateXML(xml, label) fetches it
        // from openmicroscopy.org, which CI cannot reach; the reader of the bundled copy is private.
        Field field = OMEXMLServiceImpl.class.getDeclaredField("SCHEMA_CLASSPATH_READER");
        field.setAccessible(true);
        XMLTools.SchemaReader bundledSchema = (XMLTools.SchemaReader) field.get(null);
        String outDir = args[0];
        PrintStream results = new PrintStream(new FileOutputStream(outDir + "/read.jsonl"), true, "UTF-8");
        for (int f = 1; f < args.length; f++) {
            String path = args[f];
            String storedXml = new TiffParser(path).getComment();
            IMetadata meta = service.createOMEXMLMetadata();
            ImageReader reader = new ImageReader();
            reader.setFlattenedResolutions(false);
            reader.setMetadataStore(meta);
            reader.setId(path);
            StringBuilder json = new StringBuilder();
            json.append("{\"path\": ").append(quote(path))
                .append(", \"format\": ").append(quote(reader.getFormat()))
                .append(", \"stored_xml_valid\": ")
                .append(storedXml != null && XMLTools.validateXML(storedXml, path, bundledSchema))
                .append(", \"bioformats_xml_valid\": ").append(service.validateOMEXML(service.getOMEXML(meta)))
                .append(", \"series\": [");
            for (int s = 0; s < reader.getSeriesCount(); s++) {
                reader.setSeries(s);
                json.append(s > 0 ? ", " : "").append("{\"name\": ").append(quote(meta.getImageName(s)))
                    .append(", \"resolutions\": [");
                for (int r = 0; r < reader.getResolutionCount(); r++) {
                    reader.setResolution(r);
                    String raw = outDir + "/" + (f - 1) + "_" + s + "_" + r + ".raw";
                    try (FileOutputStream out = new FileOutputStream(raw)) {
                        out.write(reader.openBytes(0));
                    }
                    json.append(r > 0 ? ", " : "")
                        .append("{\"width\": ").append(reader.getSizeX())
                        .append(", \"height\": ").append(reader.getSizeY())
                        .append(", \"samples\": ").append(reader.getRGBChannelCount())
                        .append(", \"planes\": ").append(reader.getImageCount())
                        .append(", \"pixel_type\": ").append(reader.getPixelType())
                        .append(", \"interleaved\": ").append(reader.isInterleaved())
                        .append(", \"raw\": ").append(quote(raw)).append("}");
                }
                json.append("]}");
            }
            reader.close();
            results.println(json.append("]}"));
        }
        results.close();
    }

    static String quote(String text) {
        if (text == null) {
            return "null";
        }
        StringBuilder quoted = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                quoted.append('\\').append(c);
            } else if (c < 0x20) {
                quoted.append(String.format("\\u%04x", (int) c));
            } else {
                quoted.append(c);
            }
        }
        return quoted.append('"').toString();
    }
}
