// The Vercel AI SDK (`ai`, `@ai-sdk/openai-compatible`) against a running `hybridserve serve`.
// Usage: node ai_sdk_check.mjs BASE_URL MODEL   (BASE_URL ends in /v1)
// Prints one JSON line with what happened; exits 1 on the first broken expectation (the message says which).
//  1. streamText with one tool: step 1 must call it (toolChoice names it), its `execute` runs, and the loop
//     continues (stopWhen) to a step that answers with text.
//  2. generateObject with a zod schema: the SDK sends response_format json_schema and validates the object.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, modelName] = process.argv.slice(2);
const provider = createOpenAICompatible({ name: "hybridserve", baseURL, supportsStructuredOutputs: true });
const model = provider.chatModel(modelName);

function check(cond, what) {
  if (!cond) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

const executed = [];
const weather = tool({
  description: "The current weather in a city",
  inputSchema: z.object({ city: z.string().max(24), days: z.number().int().min(1).max(7) }),
  execute: async ({ city, days }) => {
    executed.push({ city, days });
    return { city, days, sky: "sunny", celsius: 21 };
  },
});

const stream = streamText({
  model,
  tools: { get_weather: weather },
  prompt: "What is the weather in Paris for the next 3 days?",
  maxOutputTokens: 256,
  temperature: 0,
  stopWhen: stepCountIs(3),
  // Step 1 must call the tool (a named tool_choice, enforced by the server's grammar); then it answers.
  prepareStep: ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? { type: "tool", toolName: "get_weather" } : "none" }),
});
let streamedText = "";
for await (const part of stream.fullStream) {
  if (part.type === "text-delta") streamedText += part.text;
  if (part.type === "error") check(false, `stream error: ${part.error}`);
}
const steps = await stream.steps;
check(steps.length === 2, `two steps (a tool call, then an answer), got ${steps.length}`);
check(steps[0].finishReason === "tool-calls", `step 1 finishes with tool-calls, got ${steps[0].finishReason}`);
const call = steps[0].toolCalls[0];
check(call && call.toolName === "get_weather", `step 1 calls get_weather: ${JSON.stringify(steps[0].toolCalls)}`);
check(executed.length === 1 && typeof executed[0].city === "string" && Number.isInteger(executed[0].days),
      `execute ran once with the declared arguments: ${JSON.stringify(executed)}`);
check(steps[0].toolResults.length === 1 && steps[0].toolResults[0].output.sky === "sunny", "the tool result went back");
check(steps[1].toolCalls.length === 0 && ["stop", "length"].includes(steps[1].finishReason),
      `step 2 answers without a call: ${steps[1].finishReason}`);
check(streamedText === (await stream.text) || streamedText.endsWith(await stream.text), "streamed text reassembles");

const person = z.object({
  name: z.string().max(16),
  age: z.number().int().min(0).max(120),
  tags: z.array(z.enum(["a", "b", "c"])).max(3),
});
const objects = [];
for (const prompt of ["Describe a person as JSON.", "Invent a character.", "Who are you?"]) {
  const { object, finishReason } = await generateObject({ model, schema: person, prompt, maxOutputTokens: 300, temperature: 0 });
  check(person.safeParse(object).success, `generateObject returns a valid object: ${JSON.stringify(object)}`);
  check(finishReason === "stop", `generateObject finishes with stop, got ${finishReason}`);
  objects.push(object);
}
console.log(JSON.stringify({ toolCall: call.input, executed, steps: steps.length, answer: await stream.text, objects }));
